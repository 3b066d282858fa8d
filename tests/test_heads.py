"""Attention heads in the spec (docs/spec.md, "Attention heads"): heads groups tied to their :qk and :vo
head-block groups, the float64 invariant with heads and channels within heads permuted, and matching
that recovers a permuted copy. Small ViTs (32 px, patch 8, two blocks) keep it fast."""
import copy

import pytest
import timm
import torch

from mergekit_vision import trace_permutation_spec
from mergekit_vision.match import select_taps
from mergekit_vision.match.assignment import solve_heads
from mergekit_vision.permute import permute, random_perms
from mergekit_vision.errors import SpecError
from mergekit_vision.merge import align
from mergekit_vision.spec import PermutationSpec
from mergekit_vision.testing import check_recovery, check_spec, randomize_model


def _vit(name="vit_tiny_patch16_224", fused=True, **kw):
    m = timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=2, **kw).eval()
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = fused  # F.scaled_dot_product_attention, or q @ k^T -> softmax -> @ v
    return m


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fused", [True, False])
def test_vit_heads_groups(fused):
    spec = trace_permutation_spec(_vit(fused=fused), X[:1])
    heads = spec["blocks.0.attn.qkv:heads"]
    assert not heads.frozen and heads.size == 3 and heads.blocks == 1
    assert heads.heads_of == ["blocks.0.attn.qkv:qk", "blocks.0.attn.qkv:vo"]
    qk, vo = spec["blocks.0.attn.qkv:qk"], spec["blocks.0.attn.qkv:vo"]
    assert (qk.size, qk.blocks, vo.size, vo.blocks) == (192, 3, 192, 3)
    assert {(m.key, m.axis, m.start) for m in qk.members} == {
        ("blocks.0.attn.qkv.weight", 0, 0), ("blocks.0.attn.qkv.weight", 0, 192),
        ("blocks.0.attn.qkv.bias", 0, 0), ("blocks.0.attn.qkv.bias", 0, 192)}
    assert {(m.key, m.axis, m.start) for m in vo.members} == {
        ("blocks.0.attn.qkv.weight", 0, 384), ("blocks.0.attn.qkv.bias", 0, 384), ("blocks.0.attn.proj.weight", 1, 0)}
    # the heads group moves every block of both: positions in blocks of one head (inner = head dim)
    assert {(m.key, m.axis, m.start, m.length, m.inner) for m in heads.members} == {
        (m.key, m.axis, m.start, 3, 64) for m in qk.members + vo.members}
    assert spec.permutable_fraction > 0.99
    assert "moves the heads of blocks.0.attn.qkv:qk, blocks.0.attn.qkv:vo" in spec.table()


def test_heads_spec_round_trip_and_old_json():
    spec = trace_permutation_spec(_vit(), X[:1])
    d = spec.to_dict()
    again = PermutationSpec.from_dict(d)
    name = "blocks.1.attn.qkv:heads"
    assert again.to_dict() == d and again[name].heads_of == spec[name].heads_of
    # a group without heads writes no heads_of (specs of other models read as before), and old JSON loads
    plain = [g for g in d["groups"] if not g.get("heads_of")]
    assert plain and all("heads_of" not in g for g in plain)
    old = PermutationSpec.from_dict({**d, "groups": plain})
    assert all(g.heads_of == [] for g in old.groups)


@pytest.mark.parametrize("name,fused", [("vit_tiny_patch16_224", True), ("vit_tiny_patch16_224", False),
                                        ("deit_tiny_distilled_patch16_224", True), ("vit_small_patch16_224", False)])
def test_vit_invariant(name, fused):
    res = check_spec(_vit(name, fused), X)
    assert res.rel_error < 1e-9 and res.uncovered == []
    assert len([g for g in res.spec.free_groups if g.heads_of]) == 2
    assert res.spec.permutable_fraction >= 0.95


def test_wrong_heads_spec_breaks_the_invariant():
    """The invariant can fail: a heads group that leaves v's blocks behind is caught."""
    m = randomize_model(_vit().double(), 0)
    spec = trace_permutation_spec(copy.deepcopy(m).float(), X[:1])
    perms = {"blocks.0.attn.qkv:heads": torch.tensor([1, 2, 0])}
    x = X.double()
    with torch.no_grad():
        y = m(x)
        assert torch.allclose(permute(m, spec, perms)(x), y, rtol=0, atol=1e-10)
        broken = PermutationSpec.from_dict(spec.to_dict())
        g = broken["blocks.0.attn.qkv:heads"]
        g.members = [mm for mm in g.members if not (mm.key.endswith("qkv.weight") and mm.start == 384)]
        assert not torch.allclose(permute(m, broken, perms)(x), y, rtol=0, atol=1e-6)
        # within-head permutations must stay inside their heads
        within = {"blocks.0.attn.qkv:qk": torch.cat([torch.arange(64, 128), torch.arange(64), torch.arange(128, 192)])}
        with pytest.raises(Exception, match="blocks"):
            permute(m, spec, within)


def test_qk_norm_shares_the_head_dim():
    """A norm over the head dim (one affine for all heads): q/k move by one permutation shared by all
    heads, together with the norms' affines; heads stay fixed (frozen, with the reason)."""
    res = check_spec(_vit(qk_norm=True), X)
    assert res.rel_error < 1e-9
    qk = [g for g in res.spec.free_groups if any(m.key.endswith("q_norm.weight") for m in g.members)]
    assert len(qk) == 2 and all(g.size == 64 for g in qk)
    frozen = [g for g in res.spec.groups if g.frozen and "head dim is shared by all heads" in (g.reason or "")]
    assert len(frozen) == 2


def test_solve_heads_recovers_a_block_permutation():
    g = torch.Generator().manual_seed(0)
    heads, d = 4, 5
    feats = torch.randn(200, heads * d, generator=g)
    head_perm = torch.tensor([2, 0, 3, 1])
    within = torch.cat([j * d + torch.randperm(d, generator=g) for j in range(heads)])
    full = within.view(heads, d)[head_perm].reshape(-1)  # aligned channel k is B's channel full[k]
    b = torch.empty_like(feats)
    b[:, full] = feats
    score = feats.T @ b / 200
    hp, (w,) = solve_heads([score], heads)
    assert torch.equal(hp, head_perm) and torch.equal(w, within)


def test_vit_recovers_permuted_copy_from_two_tokens_per_image():
    """tap_positions on tokens ``(N, L, C)``: each tap reads 2 of the 17 tokens per image and matching
    still finds every group's inverse permutation, heads included."""
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    res = check_recovery(_vit(), x, tap_positions=2)
    assert res.wrong_groups == {} and res.max_weight_error < 1e-5


@pytest.mark.parametrize("method", ["activation", "weight"])
@pytest.mark.parametrize("name,fused", [("vit_tiny_patch16_224", True), ("deit_tiny_distilled_patch16_224", False)])
def test_vit_recovers_permuted_copy(name, method, fused):
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    res = check_recovery(_vit(name, fused), x, method=method)
    assert res.wrong_groups == {} and res.max_weight_error < 1e-5
    perms = random_perms(res.spec, torch.Generator().manual_seed(1))
    assert any(not torch.equal(p, torch.arange(p.numel())) for n, p in perms.items() if n.endswith(":heads"))


@pytest.mark.parametrize("method", ["activation", "weight"])
def test_merge_many_recovers_permuted_vits(method):
    """MergeMany's sweeps solve heads with their head blocks, and relabel them to the reference on the
    composed permutations: three permuted copies of one ViT merge back to the reference's copy."""
    from mergekit_vision.merge import merge_many

    a = randomize_model(_vit(), 0)
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    spec = trace_permutation_spec(a, x[:1])
    b0, b1 = (permute(a, spec, random_perms(spec, torch.Generator().manual_seed(s))) for s in (1, 2))
    merged, rep = merge_many([b0, a, b1], [x], method=method, repair=False, progress=False, return_report=True)
    assert rep.sweeps >= 1
    for k, v in b0.state_dict().items():
        assert torch.allclose(merged.state_dict()[k], v, atol=1e-5), k


def test_stale_attention_bias_caches_are_cleared():
    """LeViT caches its per-head attention biases in eval mode: a permuted (or merged) copy must not
    keep the original's cache, or it computes with unpermuted biases."""
    m = randomize_model(timm.create_model("levit_128s", pretrained=False).eval().double(), 0)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)).double()
    spec = trace_permutation_spec(copy.deepcopy(m).float(), x.float())
    heads = [g.name for g in spec.free_groups if g.heads_of]
    assert len(heads) == 11
    # LeViT keeps each head's q, k and v together: one head's q rows are a stride apart
    assert any(mm.stride for mm in spec[heads[0]].members)
    with torch.no_grad():
        y = m(x)  # fills the cache
        perms = {n: torch.roll(torch.arange(spec[n].size), 1) for n in heads}
        assert torch.allclose(permute(m, spec, perms)(x), y, rtol=0, atol=1e-10)


class _MHANet(torch.nn.Module):
    """nn.MultiheadAttention returning its attention weights, averaged or per head (then read by a
    linear layer, which the heads' permutation must move too)."""

    def __init__(self, per_head: bool):
        super().__init__()
        self.inp, self.mha = torch.nn.Linear(3, 16), torch.nn.MultiheadAttention(16, 4, batch_first=True)
        self.out, self.read = torch.nn.Linear(16, 5), torch.nn.Linear(4, 5)
        self.per_head = per_head

    def forward(self, x):
        t = self.inp(x.flatten(2).transpose(1, 2))
        o, w = self.mha(t, t, t, need_weights=True, average_attn_weights=not self.per_head)
        return self.out(o.mean(1)) + (self.read(w.mean((-1, -2))) if self.per_head else w.mean())


@pytest.mark.parametrize("per_head", [False, True])
def test_multihead_attention_module(per_head):
    res = check_spec(_MHANet(per_head), torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)))
    assert res.rel_error < 1e-9 and res.uncovered == []
    heads = res.spec["mha.in_proj_weight:heads"]
    assert not heads.frozen and heads.heads_of == ["mha.in_proj_weight:qk", "mha.in_proj_weight:vo"]
    assert any(m.key == "read.weight" for m in heads.members) == per_head


def test_without_heads_freezes_heads_and_their_blocks_only():
    spec = trace_permutation_spec(_vit(), X[:1])
    streams = spec.without_heads()
    tied = {n for g in spec.groups if g.heads_of for n in (g.name, *g.heads_of)}
    assert tied and all(streams[n].frozen and "on request" in streams[n].reason for n in tied)
    assert {g.name for g in streams.free_groups} == {g.name for g in spec.free_groups} - tied
    assert streams["blocks.0.attn.qkv:heads"].heads_of == spec["blocks.0.attn.qkv:heads"].heads_of  # ties kept
    assert not any(g.frozen and "on request" in (g.reason or "") for g in spec.groups)  # a copy
    # freezing one head-block group freezes its heads group and the other blocks with it
    one = spec.freeze(["blocks.1.attn.qkv:vo"], "test")
    assert {g.name for g in one.groups if g.reason == "test"} == {
        "blocks.1.attn.qkv:heads", "blocks.1.attn.qkv:qk", "blocks.1.attn.qkv:vo"}
    with pytest.raises(SpecError, match="no group named"):
        spec.freeze(["nope"], "x")
    # a merge with the streams-only spec leaves B's attention in its own order: B's qkv rows are A's
    # where A and B are the same model with heads permuted only
    a = randomize_model(_vit(), 0)
    perms = {n: p for n, p in random_perms(spec, torch.Generator().manual_seed(3)).items() if n in tied}
    b = permute(a, spec, perms)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    back = align(a, b, [x], spec=streams, progress=False).state_dict()
    assert torch.equal(back["blocks.0.attn.qkv.weight"], b.state_dict()["blocks.0.attn.qkv.weight"])
    full = align(a, b, [x], spec=spec, progress=False).state_dict()
    torch.testing.assert_close(full["blocks.0.attn.qkv.weight"], a.state_dict()["blocks.0.attn.qkv.weight"])


class _InterleavedAttention(torch.nn.Module):
    """Each head's q, k and v side by side in one projection (MaxViT's ``view(B, N, heads, 3 * dim)
    .chunk(3)``): no single range of the projection's output holds the q/k group's channels."""

    def __init__(self, dim=48, heads=3):
        super().__init__()
        self.heads, self.d = heads, dim // heads
        self.embed = torch.nn.Conv2d(3, dim, 4, 4)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, 10)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, 3 * self.d).transpose(1, 2).chunk(3, dim=3)
        attn = ((q @ k.transpose(-2, -1)) * self.d ** -0.5).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return self.head(x.mean(1))


def test_heads_with_interleaved_qkv_are_matched_from_gathered_taps():
    model = _InterleavedAttention()
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    spec = trace_permutation_spec(model, x[:1])
    qk = spec["qkv:qk"]
    assert not spec["qkv:heads"].frozen and qk.taps and not any(t.length == qk.size for t in qk.taps)
    taps = select_taps(qk)  # q's rows of every head, and k's: two gathered taps
    assert [t.pieces for t in taps] == [((0, 0, 16), (48, 16, 16), (96, 32, 16)), ((16, 0, 16), (64, 16, 16),
                                                                                   (112, 32, 16))]
    rec = check_recovery(model, x)
    assert rec.wrong_groups == {} and rec.max_weight_error < 1e-6, rec.wrong_groups
    assert rec.report.groups["qkv:qk"].note is None  # matched on its activations, not on weights


def test_one_stream_split_into_heads_by_two_blocks_does_not_move_heads_twice():
    # GCViT: a stage's one global query (the residual stream's channels) is split into heads by each of its
    # global blocks, on head axes nothing joins; those heads must stay fixed, or two heads groups would move
    # the same blocks apart (the float64 check failed at 1e-3 before)
    from timm.models.gcvit import GlobalContextVit

    model = GlobalContextVit(depths=(1, 1, 4, 1), num_heads=(1, 2, 4, 4), embed_dim=16, img_size=224,
                             num_classes=10)
    res = check_spec(model, torch.randn(1, 3, 224, 224))
    assert res.rel_error < 1e-9 and res.uncovered == []
    twice = [g for g in res.spec.groups if "also split into heads elsewhere" in (g.reason or "")]
    assert {g.name.split(".attn")[0] for g in twice} == {"stages.2.blocks.1", "stages.2.blocks.3"}
    assert res.spec.permutable_fraction > 0.99
    rec = check_recovery(model, torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    assert rec.wrong_groups == {} and rec.max_weight_error < 1e-6
