"""merge_many(): permuted copies recovered, weights honoured, agreement with merge() for two models,
statistics that add exactly across shards, the near-identity report, errors."""
import json
import logging

import pytest
import torch

from mergekit_vision import merge, merge_many, permute, random_perms, trace_permutation_spec
from mergekit_vision.errors import ArchitectureMismatchError, ConfigError, DataError
from mergekit_vision.merge_many import Statistics, collect_statistics, plan_calibration
from mergekit_vision.models import create_model, tiny_resnet
from mergekit_vision.testing import randomize_model
from mergekit_vision.options import REPAIR_MODES

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(y, ref):
    return float((y - ref).norm() / ref.norm())


def _copies(model, x, k, seed=1):
    a = randomize_model(model.eval(), seed=0)
    spec = trace_permutation_spec(a, x[:1])
    return a, [permute(a, spec, random_perms(spec, torch.Generator().manual_seed(seed + i))) for i in range(k)]


@pytest.mark.parametrize("method,iterations", [("activation", 0), ("activation", 3), ("weight", 0), ("weight", 3)])
def test_permuted_copies_recover_the_model(method, iterations):
    torch.manual_seed(0)
    x = torch.randn(64, 1, 16, 16)
    a, copies = _copies(tiny_resnet(8), x, 3)
    with torch.no_grad():
        merged, rep = merge_many([a] + copies, list(x.split(32)), method=method, iterations=iterations,
                                 repair=False, progress=False, return_report=True)
        assert _rel(merged(x), a(x)) < 1e-5
        for k, v in a.state_dict().items():
            assert torch.allclose(v.float(), merged.state_dict()[k].float(), atol=1e-6), k
    moved = rep.moved()
    assert moved[0] == 0 and all(m > 0.5 for m in moved[1:])  # random permutations move most channels
    assert rep.near_identity is False
    if iterations:
        assert rep.converged and rep.changes_per_sweep[-1] == 0


def test_any_reference_and_repair_on_a_model_without_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 16, 16)
    a, copies = _copies(create_model("resnet20", norm="ln"), x, 2)
    with torch.no_grad():
        # the reference's channel order is kept: reference=2 is `a` itself
        merged = merge_many(copies + [a], [x], reference=2, repair=True, progress=False)
        assert _rel(merged(x), a(x)) < 1e-4  # one batch: REPAIR's batch statistics are the pooled ones
        assert all(torch.allclose(v, merged.state_dict()[k], atol=1e-4) for k, v in a.state_dict().items())


@pytest.mark.parametrize("repair", [False, True, "reset"])
def test_two_models_agree_with_merge(repair):
    torch.manual_seed(0)
    x = torch.randn(96, 1, 16, 16)
    a, b = (randomize_model(tiny_resnet(8).eval(), seed=s) for s in (1, 2))
    calib = list(x.split(32))
    ref = merge(a, b, calib, alpha=0.3, repair=repair, progress=False)
    got = merge_many([a, b], calib, weights=[7, 3], repair=repair, progress=False)
    for k, v in ref.state_dict().items():
        assert torch.allclose(v.double(), got.state_dict()[k].double(), atol=1e-6), k


def test_tap_policy_reaches_the_statistics_pass():
    torch.manual_seed(0)
    x = torch.randn(96, 1, 16, 16)
    a, b = (randomize_model(tiny_resnet(8).eval(), seed=s) for s in (1, 2))
    calib = list(x.split(32))
    ref = merge(a, b, calib, taps="blocks", progress=False)
    got = merge_many([a, b], calib, taps="blocks", progress=False)
    for k, v in ref.state_dict().items():
        assert torch.allclose(v.double(), got.state_dict()[k].double(), atol=1e-6), k
    plan = plan_calibration(a, x[:1])
    keys = {p: {key[:2] for key in collect_statistics([a, b], calib, plan, pairs=[(0, 1)], taps=p).cross}
            for p in ("all", "blocks")}
    assert keys["blocks"] < keys["all"]
    with pytest.raises(ConfigError, match="taps"):
        merge_many([a, b], calib, taps="few", progress=False)
    with pytest.raises(ConfigError, match="weight_tol"):
        merge_many([a, b], calib, method="weight", weight_tol=-1, progress=False)


def test_tap_positions_sample_each_batch_alike_wherever_it_is():
    """tap_positions=P: each tap's cross-moments are those of P positions per image, the same ones for a
    batch's images, drawn from the batch's contents and the tap: shards pool to the whole, a batch samples
    the same positions anywhere in the stream, REPAIR's site statistics see every position."""
    torch.manual_seed(0)
    x = torch.randn(120, 1, 16, 16)
    ms = [randomize_model(tiny_resnet(8).eval(), seed=s) for s in (1, 2)]
    plan = plan_calibration(ms[0], x[:1])
    batches = list(x.split(20))
    req = dict(pairs=[(0, 1)], sites=True, tap_positions=5)
    whole = collect_statistics(ms, batches, plan, **req)
    pooled = sum(collect_statistics(ms, batches[i::3], plan, **req) for i in range(3))
    backwards = collect_statistics(ms, batches[::-1], plan, **req)
    tw, tp, tb = whole.as_tensors(), pooled.as_tensors(), backwards.as_tensors()
    assert list(tw) == list(tp) == list(tb)
    assert all(torch.allclose(tp[k], tw[k], rtol=1e-12, atol=1e-9) and torch.allclose(tb[k], tw[k], rtol=1e-12,
                                                                                        atol=1e-9) for k in tw)
    full = collect_statistics(ms, batches, plan, pairs=[(0, 1)], sites=True)
    spatial = [k for k, m in whole.cross.items() if m.n > whole.samples]  # taps with positions
    assert spatial and all(whole.cross[k].n == 5 * whole.samples for k in spatial)
    assert all(full.cross[k].n > 5 * full.samples for k in spatial)
    assert all(torch.equal(whole.channels[k].m2, full.channels[k].m2) for k in full.channels)  # sites: all positions
    # the moments are exactly those of the drawn positions: one batch, one tap, by hand
    from mergekit_vision.match.activation import tap_plan
    from mergekit_vision.match.stats import CrossMoments, batch_key, sample_positions, tap_generator
    g, t = next((g, t) for node, ts in tap_plan(plan.spec).items() for g, t in ts if (g, node, 0, 1) in spatial)
    one = collect_statistics(ms, batches[:1], plan, pairs=[(0, 1)], tap_positions=5).cross[(g, t.node, 0, 1)]
    vals = []
    for m in ms:
        interp = torch.fx.Interpreter(torch.fx.GraphModule(m, plan.gm.graph), garbage_collect_values=False)
        interp.run(batches[0])
        vals.append(next(v for n, v in interp.env.items() if n.name == t.node))
    c, h, w = vals[0].shape[1:]
    idx = sample_positions(h * w, 5, tap_generator(batch_key(batches[0]), t.node))
    at = [v.flatten(2)[:, :, idx].transpose(1, 2).reshape(-1, c) for v in vals]
    ref = CrossMoments()
    ref.update(at[0], at[1])
    assert one.n == 5 * 20 and torch.allclose(one.ma, ref.ma, atol=1e-6)
    assert torch.allclose(one.mab, ref.mab, rtol=1e-5, atol=1e-5)  # float32 products, summed in another order
    with pytest.raises(ConfigError, match="tap_positions"):
        merge_many(ms, batches, tap_positions=0, progress=False)
    # too few sampled positions for a group's channels: the warning names the option as well as the data
    from mergekit_vision.errors import CalibrationWarning
    with pytest.warns(CalibrationWarning, match=r"tap_positions=1; None takes every position"):
        merge_many(ms, [batches[0][:6]], tap_positions=1, repair=False, progress=False)


def test_weights_are_honoured():
    torch.manual_seed(0)
    x = torch.randn(64, 1, 16, 16)
    ms = [randomize_model(tiny_resnet(8).eval(), seed=s) for s in (1, 2, 3)]
    with torch.no_grad():
        only_b = merge_many(ms, [x], weights=[0, 1, 0], repair=False, progress=False)
        assert _rel(only_b(x), ms[1](x)) < 1e-5  # B in A's channel order: the same function
        for iters in (0, 2):
            w1 = merge_many(ms, [x], weights=[1, 2, 5], iterations=iters, repair=False, progress=False)
            w2 = merge_many(ms, [x], weights=[0.125, 0.25, 0.625], iterations=iters, repair=False, progress=False)
            assert all(torch.equal(v, w2.state_dict()[k]) for k, v in w1.state_dict().items())
        naive = merge_many(ms, [x], weights=[1, 2, 5], method="none", repair=False, progress=False)
        sds = [m.state_dict() for m in ms]
        key = "layer1.0.conv1.weight"
        assert torch.allclose(naive.state_dict()[key], (sds[0][key] + 2 * sds[1][key] + 5 * sds[2][key]) / 8, atol=1e-6)


def test_statistics_of_shards_add_up_to_the_whole():
    torch.manual_seed(0)
    x = torch.randn(120, 1, 16, 16)
    ms = [randomize_model(tiny_resnet(8).eval(), seed=s) for s in (1, 2, 3)]
    plan = plan_calibration(ms[0], x[:1])
    req = dict(pairs=[(0, 1), (0, 2), (1, 2)], sites=True)
    batches = list(x.split(20))
    whole = collect_statistics(ms, batches, plan, **req)
    shards = [collect_statistics(ms, batches[i::3], plan, **req) for i in range(3)]
    pooled = sum(shards)
    assert pooled.samples == whole.samples == 120
    tw, tp = whole.as_tensors(), pooled.as_tensors()
    assert list(tw) == list(tp) and len(tw) > 50
    for k in tw:
        assert tw[k].dtype == torch.float64
        assert torch.allclose(tp[k], tw[k], rtol=1e-12, atol=1e-9), k  # float64 sums: equal up to rounding
    # a round trip through plain tensors (what a worker all-reduces or a client sends) loses nothing
    back = Statistics.from_tensors({k: v.numpy() for k, v in tp.items()}).as_tensors()
    assert all(torch.equal(back[k], tp[k]) for k in tp)
    # the correction pass's measurements pool the same way
    merged = merge_many(ms, batches, repair=False, progress=False)
    targets = {s.node: None for s in plan.sites}
    from mergekit_vision.merge_many import repair_targets
    targets = repair_targets(plan.sites, whole, [{}, {}, {}], [1 / 3] * 3)
    fix = dict(correction=True, targets=targets)
    one = collect_statistics([merged], batches, plan, **fix).as_tensors()
    two = (collect_statistics([merged], batches[:3], plan, **fix)
           + collect_statistics([merged], batches[3:], plan, **fix)).as_tensors()
    assert all(torch.allclose(two[k], one[k], rtol=1e-12, atol=1e-9) for k in one)


def test_models_from_a_common_init_are_reported_as_near_identity(caplog):
    torch.manual_seed(0)
    x = torch.randn(64, 1, 16, 16)
    base = randomize_model(tiny_resnet(8).eval(), seed=1)
    ms = []
    for s in range(3):  # FedAvg-like clients: small drifts from one global model
        m = randomize_model(tiny_resnet(8).eval(), seed=1)
        g = torch.Generator().manual_seed(10 + s)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        ms.append(m)
    # by default the lineage test sees one coordinate system and skips the matching
    merged, rep = merge_many(ms, [x], iterations=5, repair=False, progress=False, return_report=True)
    assert min(rep.lineage_cosines) > 0.9 and rep.matching_skipped and "shared lineage" in rep.summary()
    assert rep.near_identity is True and max(rep.moved()) == 0.0
    naive = merge_many(ms, [x], method="none", repair=False, progress=False)
    assert all(torch.equal(v, naive.state_dict()[k]) for k, v in merged.state_dict().items())
    # forced matching finds (nearly) identity and says so
    with caplog.at_level(logging.WARNING, logger="mergekit_vision.merge_many"):
        merged, rep = merge_many(ms, [x], iterations=5, repair=False, progress=False, return_report=True,
                                 lineage_threshold=None)
    assert rep.matching_skipped is None
    assert rep.near_identity is True and rep.sweeps == 0  # the sweeps are skipped, not run for nothing
    assert max(rep.moved()) <= 0.05
    assert "nearly) identity" in caplog.text and "nearly) identity" in rep.summary()
    assert base is not None and merged is not None


def test_lineage_test_separates_related_from_independent_models():
    from mergekit_vision.match import LINEAGE_THRESHOLD, lineage_cosine

    a = randomize_model(tiny_resnet(8).eval(), seed=1)
    b = randomize_model(tiny_resnet(8).eval(), seed=2)
    assert abs(lineage_cosine(a.state_dict(), b.state_dict())) < 0.1  # independent
    x = torch.randn(64, 1, 16, 16)
    spec = trace_permutation_spec(a, x[:1])
    pb = permute(a, spec, random_perms(spec, torch.Generator().manual_seed(0)))
    assert lineage_cosine(a.state_dict(), pb.state_dict()) < LINEAGE_THRESHOLD  # a permuted copy: matched
    merged, rep = merge(a, pb, [x], repair=False, progress=False, return_report=True)
    with torch.no_grad():
        assert rep.matching_skipped is None and _rel(merged(x), a(x)) < 1e-5
    merged, rep = merge(a, a, [x], repair=False, progress=False, return_report=True)
    assert rep.lineage_cosine == pytest.approx(1.0) and "shared lineage" in rep.matching_skipped


def test_errors_name_the_problem():
    x = torch.randn(8, 1, 16, 16)
    a, b = tiny_resnet(8).eval(), tiny_resnet(8).eval()
    with pytest.raises(ConfigError, match="weights has 3 entries"):
        merge_many([a, b], [x], weights=[1, 1, 1], progress=False)
    with pytest.raises(ConfigError, match="non-negative"):
        merge_many([a, b], [x], weights=[1, -1], progress=False)
    with pytest.raises(ConfigError, match="reference"):
        merge_many([a, b], [x], reference=2, progress=False)
    with pytest.raises(ConfigError, match="iterations"):
        merge_many([a, b], [x], iterations=-1, progress=False)
    with pytest.raises(ConfigError, match="unknown method"):
        merge_many([a, b], [x], method="zip", progress=False)
    with pytest.raises(ConfigError, match=f"unknown repair mode 'flow'; valid: {', '.join(REPAIR_MODES)}"):
        merge_many([a, b], [x], repair="flow", progress=False)
    with pytest.raises(DataError, match="calibration data"):
        merge_many([a, b], progress=False)
    with pytest.raises(ArchitectureMismatchError, match=r"models\[1\]"):
        merge_many([a, tiny_resnet(4)], [x], progress=False)
    # data-free: weight matching without REPAIR traces on an example batch
    assert merge_many([a, b], method="weight", repair=False, example=x[:1], progress=False) is not None


def test_recipe_helpers_split_and_gossip():
    from mergekit_vision.recipes.federated import GossipTrainer, dirichlet_split

    y = torch.arange(600) % 10
    parts = dirichlet_split(y, 4, 0.3, seed=1)
    assert sorted(torch.cat(parts).tolist()) == list(range(600))  # a partition: every sample once
    assert all(len(p) >= 10 for p in parts)
    assert all(torch.equal(a, b) for a, b in zip(parts, dirichlet_split(y, 4, 0.3, seed=1)))
    x = torch.randn(64, 1, 16, 16)
    nodes = [tiny_resnet(4), tiny_resnet(4)]
    trainer = GossipTrainer(nodes, [(x[:32], y[:32]), (x[32:], y[32:64])], total_steps=2, batch_size=8,
                            gossip_prob=1.0)
    trainer.run(1)  # one step each, then the pair averages: both hold the same weights
    assert trainer.gossip_events == 1
    assert all(torch.equal(v, nodes[1].state_dict()[k]) for k, v in nodes[0].state_dict().items())


def test_stream_repair_serves_n_models():
    """repair="stream" for three permuted copies: the stream corrections (explicit ChannelAffine on identity
    shortcuts) give the model back, and the variance diagnostic sees them."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 16, 16)
    a, copies = _copies(create_model("resnet20", norm="bn"), x, 2)
    with torch.no_grad():
        merged, rep = merge_many([a] + copies, [x], repair="stream", progress=False, return_report=True)
        assert isinstance(merged, torch.fx.GraphModule)  # identity shortcuts: explicit corrections
        assert _rel(merged(x), a(x)) < 1e-4
    adds = {k: s for k, s in rep.sites.items() if s.kind == "add"}
    assert adds and all(abs(s.var_ratio_after - 1) < 1e-3 for s in adds.values())


def test_n_way_merge_saves_with_provenance_and_round_trips(tmp_path):
    from mergekit_vision import load_safetensors, save_safetensors

    torch.manual_seed(0)
    x = torch.randn(32, 1, 16, 16)
    ms = [randomize_model(tiny_resnet(8).eval(), seed=s) for s in (1, 2, 3)]
    merged = merge_many(ms, [x], weights=[1, 2, 1], progress=False)
    sd, meta = load_safetensors(save_safetensors(merged, tmp_path / "m.safetensors"))
    assert meta["merge_method"] == "activation" and meta["repair"] == "repair" and meta["alpha"] is None
    assert meta["weights"] == [0.25, 0.5, 0.25] and meta["reference"] == 0
    assert [s["role"] for s in meta["sources"]] == ["models[0]", "models[1]", "models[2]"]
    assert len({s["sha256"] for s in meta["sources"]}) == 3 and meta["calibration_samples"] == 32
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in sd.items())
    rep = merged.merge_report
    assert set(rep.rows) == set(rep.groups) and all(len(r) == 3 for r in rep.rows.values())
    assert json.loads(rep.to_json())["groups"].keys() == rep.groups.keys()


def test_one_report_reads_as_before_for_two_models():
    torch.manual_seed(0)
    x = torch.randn(32, 1, 16, 16)
    a, b = (randomize_model(tiny_resnet(8).eval(), seed=s) for s in (1, 2))
    _, rep = merge(a, b, [x], alpha=0.25, progress=False, return_report=True)
    assert rep.alpha == 0.25 and rep.weights == [0.75, 0.25] and rep.num_models == 2
    assert all(rep.groups[n] is rs[1] for n, rs in rep.rows.items())  # B's row against A
    assert all(rs[0].moved == 0 for rs in rep.rows.values())
    assert rep.lineage_cosine == rep.lineage_cosines[1] and rep.summary().startswith("merge: method=activation")
    d = json.loads(rep.to_json())
    assert {"method", "alpha", "repair", "groups", "sites", "timings", "sources", "lineage_cosine", "lineage_keys",
            "matching_skipped", "calibration_samples"} <= set(d)
    assert {"pass_ab", "match", "interpolate", "pass_repair", "fuse"} <= set(rep.timings)
