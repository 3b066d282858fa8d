"""Streamed moments: stable against large means and near-constant channels, bounded correlations,
exact pooling of shards."""
import torch

from mergekit_vision.match.stats import ChannelMoments, CrossMoments


def _reference_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two-pass float64 Pearson correlation of (positions, C) matrices."""
    a, b = a.double(), b.double()
    ac, bc = a - a.mean(0), b - b.mean(0)
    return (ac.T @ bc) / torch.outer(ac.norm(dim=0), bc.norm(dim=0))


def _batches(x, size):
    return list(x.split(size))


def test_correlations_survive_large_channel_means():
    """Channels at mean 1e4 with unit spread: a raw-moment formula in float32 returns garbage far
    outside [-1, 1]; centred per-batch moments match the float64 two-pass reference."""
    g = torch.Generator().manual_seed(0)
    n, c = 8192, 16
    z = torch.randn(n, c, generator=g)
    a = (z + 1e4 * torch.rand(c, generator=g)).float()
    b = (z[:, torch.randperm(c, generator=g)] + 0.1 * torch.randn(n, c, generator=g) - 3e3).float()
    mom = CrossMoments()
    for xa, xb in zip(_batches(a, 1000), _batches(b, 1000)):
        mom.update(xa, xb)
    corr = mom.correlation()
    assert corr.dtype == torch.float64
    assert float((corr - _reference_corr(a, b)).abs().max()) < 1e-5
    assert float(corr.abs().max()) <= 1.0


def test_long_batches_keep_float32_products_within_1e6_of_float64():
    """A batch of 250 feature maps of 32 x 32 (256,000 positions, as resnet20's first stage sees at 32 px).
    Reduced over all positions at once in float32, the sums of squares drift by ~5e-6 (correlations by
    ~2e-5) and one GEMM's cross sums by ~1e-6; per-sample norms and GEMMs over chunks of samples, pooled
    in float64, stay near float32's own rounding of the reference."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(250, 16, 32, 32, generator=g)
    a = (base + 0.5 * torch.randn(base.shape, generator=g) + 3).relu()
    b = (base.roll(1, 1) + torch.randn(base.shape, generator=g) + 1).relu()
    got, ref = CrossMoments(), CrossMoments()
    got.observe(a, b, 1)
    ref.observe(a.double(), b.double(), 1)
    assert float((got.correlation() - ref.correlation()).abs().max()) < 1e-6
    assert float(((got.maa - ref.maa) / ref.maa).abs().max()) < 1e-6
    assert float((got.mab - ref.mab).abs().max() / ref.mab.abs().max()) < 3e-7


def test_batched_chunks_as_on_a_gpu_equal_the_chunk_loop():
    """The GPU's one batched GEMM over whole chunks (plus the loop for the rest) sums the same chunk
    products as the CPU's loop: checked here on the CPU, in float64."""
    from mergekit_vision.match.stats import CHUNK, _gram, centre

    g = torch.Generator().manual_seed(4)
    for shape in [(120, 6, 9, 9), (5, 3, 64, 64), (5000, 7, 1, 1)]:  # each with whole chunks and a rest
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        y = torch.randn(shape, generator=g, dtype=torch.float64) + x
        ra, rb = centre(x, 1).rows, centre(y, 1).rows
        wa, wb = (r.centred(0, r.shape[1]).view(r.shape) for r in (ra, rb))
        step = max(1, CHUNK // (shape[2] * shape[3]))
        assert shape[0] >= 2 * step  # the batched path runs (and, but for (5, 3, 64, 64), the loop after it)
        looped, batched = _gram(ra, rb, batched=False), _gram(ra, rb, batched=True)
        assert torch.allclose(looped, batched, rtol=1e-12, atol=1e-9)
        assert torch.allclose(batched, wa.reshape(shape[1], -1) @ wb.reshape(shape[1], -1).T, rtol=1e-12, atol=1e-9)


def test_chunked_products_and_blocked_pooling_are_the_whole_batch_arithmetic():
    """A cross-moment centres each chunk of samples into a reused buffer just before its GEMM and pools
    into its float64 matrix in row blocks: the products of the whole centred batch (float64: to
    rounding), the rows of any layout those of ``x - mean``, a blocked add the plain add bit for bit, and
    the mean of a group's correlations (summed as they are formed) the mean of the stacked matrices."""
    from mergekit_vision.match.stats import ADD_BLOCK, _accumulate, centre, mean_correlations

    g = torch.Generator().manual_seed(7)
    for shape, dim in [((300, 640, 1, 1), 1), ((40, 24, 9, 9), 1), ((8, 17, 12), 2), ((50, 30), 1)]:
        xs = [torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 5 for _ in range(3)]
        ys = [x * 0.5 + torch.randn(shape, generator=g, dtype=torch.float64) for x in xs]
        mom = CrossMoments()
        for x, y in zip(xs, ys):
            mom.observe(x, y, dim)
        flat = [torch.cat([t.movedim(dim, -1).reshape(-1, shape[dim]) for t in ts]) for ts in (xs, ys)]
        ac, bc = (f - f.mean(0) for f in flat)
        assert torch.allclose(mom.mab, ac.T @ bc, rtol=1e-12, atol=1e-9), shape
        rows = centre(xs[0], dim).rows
        want = xs[0].movedim(dim, 0) - centre(xs[0], dim).moments.mean.view((-1,) + (1,) * (xs[0].dim() - 1))
        assert torch.equal(rows.centred(0, rows.shape[1]).reshape(want.shape), want), shape
    from mergekit_vision.match.stats import MOMENT_BLOCK, _block_samples, cross_sum

    empty = cross_sum(torch.ones(0, 5, 3, 3), torch.ones(0, 4, 3, 3), 1)  # a batch without samples
    assert torch.equal(empty, torch.zeros(5, 4, dtype=torch.float64))

    cpu, elsewhere = torch.empty(1), torch.empty(1, device="meta")  # (a GPU's rule: any device but the CPU's)
    assert _block_samples(cpu, 256, MOMENT_BLOCK // 4) == 4 and _block_samples(elsewhere, 256, MOMENT_BLOCK // 4) == 256
    dst, src = torch.randn(700, 700, generator=g, dtype=torch.float64), torch.randn(700, 700, generator=g)
    assert dst.numel() > ADD_BLOCK
    assert torch.equal(_accumulate(dst.clone(), src), dst + src)
    moms = []
    for _ in range(20):  # more than torch's sum adds in one run before it sums pairwise
        m = CrossMoments()
        x = torch.randn(64, 5, generator=g)
        m.update(x, x + torch.randn(64, 6, generator=g)[:, :5])
        moms.append(m)
    got = mean_correlations(("g", m) for m in moms)["g"]
    assert torch.allclose(got, torch.stack([m.correlation() for m in moms]).mean(0), rtol=0, atol=1e-15)


def test_channels_nchw_layout_matches_positions_view():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 4, 3, generator=g) * 3 + 50
    y = torch.randn(6, 5, 4, 3, generator=g) + x
    mom, ref = CrossMoments(), CrossMoments()
    mom.observe(x, y, 1)
    ref.update(x.movedim(1, -1).reshape(-1, 5), y.movedim(1, -1).reshape(-1, 5))
    assert torch.allclose(mom.correlation(), ref.correlation(), atol=1e-6)
    cm = ChannelMoments()
    cm.observe(x, 1)
    assert torch.allclose(cm.mean, x.double().mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(cm.var, x.double().var((0, 2, 3), correction=0), rtol=1e-5)


def test_constant_channels_get_zero_correlation_and_everything_stays_bounded():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(512, 4, generator=g)
    a[:, 1] = 7.25  # constant (e.g. a dead ReLU channel plus its bias)
    a[:, 2] = 0.0   # all zero
    b = a.clone()
    mom = CrossMoments()
    mom.update(a, b)
    corr = mom.correlation()
    alive_a, alive_b = mom.alive()
    assert alive_a.tolist() == [True, False, False, True] and alive_b.tolist() == alive_a.tolist()
    assert torch.all(corr[1] == 0) and torch.all(corr[:, 2] == 0)
    assert abs(float(corr[0, 0]) - 1) < 1e-6 and abs(float(corr[3, 3]) - 1) < 1e-6
    assert float(corr.abs().max()) <= 1.0


def test_one_sample_gives_no_evidence_not_nonsense():
    mom = CrossMoments()
    x = torch.randn(1, 8)
    mom.update(x, x)
    assert torch.all(mom.correlation() == 0)
    cm = ChannelMoments()
    cm.observe(x, 1)
    assert not bool(cm.alive.any()) and torch.all(cm.var == 0)


def test_shards_pool_to_the_whole_in_any_order():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(900, 6, generator=g, dtype=torch.float64) * 5 + 100
    b = torch.randn(900, 6, generator=g, dtype=torch.float64) - 40
    whole, parts = CrossMoments(), []
    whole.update(a, b)
    for sl in (slice(0, 100), slice(100, 550), slice(550, 900)):
        m = CrossMoments()
        m.update(a[sl], b[sl])
        parts.append(m)
    for pooled in (parts[0] + parts[1] + parts[2], parts[2] + (parts[0] + parts[1])):
        assert pooled.n == whole.n
        for f in ("ma", "mb", "maa", "mbb", "mab"):
            assert torch.allclose(getattr(pooled, f), getattr(whole, f), rtol=1e-12, atol=1e-9), f
    cw, cp = ChannelMoments(), ChannelMoments()
    cw.observe(a, 1)
    for sl in (slice(0, 300), slice(300, 900)):
        part = ChannelMoments()
        part.observe(a[sl], 1)
        cp = cp + part
    assert torch.allclose(cp.mean, cw.mean, rtol=1e-12) and torch.allclose(cp.var, cw.var, rtol=1e-12)


def test_channel_moments_are_centres_sums_without_the_copy():
    """channel_moments (blocks of samples, one reused buffer) gives centre's moments bit for bit, in any
    layout and dtype, one position per sample or many."""
    from mergekit_vision.match.stats import centre, channel_moments

    g = torch.Generator().manual_seed(0)
    for shape, dim in [((7, 5, 9, 11), 1), ((300, 40, 6, 6), 1), ((64, 33, 1, 1), 1), ((16, 10), 1),
                       ((4, 17, 12), 2), ((3, 8, 5, 5), 3)]:
        for dtype in (torch.float32, torch.float64):
            x = (torch.randn(shape, generator=g) * 3 + 100).to(dtype)
            want, got = centre(x, dim).moments, channel_moments(x, dim)
            assert got.n == want.n and torch.equal(got.mean, want.mean) and torch.equal(got.m2, want.m2), (shape, dtype)


def test_renormalized_batchnorm_is_the_batchnorm_then_the_renormalization():
    """REPAIR's BatchNorm site in one BatchNorm: z's moments from x's through the affine, the correction
    in the BatchNorm's weight and bias; the same output and moments as forming z first (float64 rounding)."""
    from torch import nn

    from mergekit_vision.match.stats import channel_moments
    from mergekit_vision.repair.correct import Target, renormalize, renormalized_bn
    from mergekit_vision.repair.sites import bn_eval

    g = torch.Generator().manual_seed(1)
    for affine in (True, False):
        bn = nn.BatchNorm2d(6, affine=affine).double().eval()
        bn.running_mean.normal_(generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        if affine:
            bn.weight.data.normal_(generator=g)
            bn.weight.data[0] = 0.0  # a dead channel: z constant
            bn.bias.data.normal_(generator=g)
        x = torch.randn(8, 6, 5, 5, generator=g, dtype=torch.float64) * 2 + 1
        f64 = dict(generator=g, dtype=torch.float64)
        target = Target(torch.randn(6, **f64), torch.rand(6, **f64))
        z = bn_eval(bn, x)
        want_mom = channel_moments(z, 1)
        want = renormalize(z, 1, target, want_mom)
        got, mom = renormalized_bn(bn, x, target)
        assert torch.allclose(mom.mean, want_mom.mean, rtol=1e-12, atol=1e-12)
        assert torch.allclose(mom.m2, want_mom.m2, rtol=1e-12, atol=1e-12)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)
