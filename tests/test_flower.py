"""The Flower recipes: AlignedFedAvg runs 2 rounds with 3 clients; the one-shot ServerApp's merge, built from
client statistics only, equals merge_many on the pooled client data."""
import pytest
import torch

flwr = pytest.importorskip("flwr", minversion="1.42",
                           reason="Flower is not installed: pip install -e '.[federated]' (CI installs it via [test])")

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402

from mergekit_vision import merge_many  # noqa: E402
from mergekit_vision.data import digits_dataset  # noqa: E402
from mergekit_vision.models import tiny_resnet  # noqa: E402
from mergekit_vision.recipes.flower import (AlignedFedAvg, client_app, oneshot_server_app,  # noqa: E402
                                            run_inprocess, state_dict_of)
from mergekit_vision.training import evaluate, train_classifier  # noqa: E402

CLIENTS = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    return tiny_resnet(8, in_chans=1)


def _partition(i):
    x, y = digits_dataset(16, "train").tensors
    idx = torch.arange(i, 1347, CLIENTS)  # a third of digits' training split per client
    return x[idx], y[idx]


def _data(context):
    x, y = _partition(int(context.node_config["partition-id"]))
    return torch.utils.data.TensorDataset(x, y), list(x.split(100))


def _train(model, data, config):
    train_classifier(model, data, epochs=int(config.get("epochs", 1)), batch_size=16, lr=0.1,
                     seed=int(config.get("server-round", 0)))
    return {"train-acc": evaluate(model, data)["acc"]}


@pytest.mark.slow
def test_aligned_fedavg_runs_two_rounds_with_three_clients():
    test = digits_dataset(16, "test")
    strategy = AlignedFedAvg(_model, method="activation", repair=True, example=torch.zeros(1, 1, 16, 16),
                             fraction_evaluate=0.0, min_train_nodes=CLIENTS, min_available_nodes=CLIENTS)
    out = {}
    app = ServerApp()

    @app.main()
    def main(grid, context):
        torch.manual_seed(0)
        out["result"] = strategy.start(grid, ArrayRecord.from_torch_state_dict(_model().state_dict()), num_rounds=2,
                                       train_config=ConfigRecord({"epochs": 1}),
                                       evaluate_fn=lambda rnd, arrays: MetricRecord(
                                           {"acc": evaluate(_load(arrays), test)["acc"]}))

    run_inprocess(app, client_app(_model, _data, _train), CLIENTS)
    result = out["result"]
    assert sorted(strategy.reports) == [1, 2]
    for rnd, rep in strategy.reports.items():
        assert rep.weights[0] == 0.0 and len(rep.weights) == CLIENTS + 1  # the global model only sets the order
        assert rep.calibration_samples == 1347  # statistics from all three clients
        assert set(result.train_metrics_clientapp[rnd]) >= {"train-acc", "align-moved", "align-near-identity"}
    accs = [result.evaluate_metrics_serverapp[r]["acc"] for r in (0, 1, 2)]
    assert accs[2] > accs[0] + 0.2, accs  # it learns
    assert set(state_dict_of(result.arrays)) == set(_model().state_dict())


def _load(arrays):
    m = _model()
    m.load_state_dict(state_dict_of(arrays))
    return m.eval()


@pytest.mark.slow
def test_oneshot_merge_from_client_statistics_equals_merge_on_pooled_data():
    got = {}

    def keep(merged, report, models):
        got.update(merged=merged, report=report, models=models)

    app = oneshot_server_app(_model, example=torch.zeros(1, 1, 16, 16), min_nodes=CLIENTS, repair=True,
                             train_config={"epochs": 2}, on_merged=keep)
    ctx = run_inprocess(app, client_app(_model, _data, _train), CLIENTS)
    models, rep = got["models"], got["report"]
    assert rep.calibration_samples == 1347 and rep.near_identity is False  # independent inits: real permutations
    # the same merge with all clients' calibration batches in one place
    pooled = [b for i in range(CLIENTS) for b in _partition(i)[0].split(100)]
    ref = merge_many(models, pooled, weights=rep.weights, repair=True, progress=False)
    merged = state_dict_of(ctx.state["merged"])
    for k, v in ref.state_dict().items():
        assert torch.allclose(merged[k].double(), v.double(), rtol=1e-5, atol=1e-6), k


@pytest.mark.slow
@pytest.mark.parametrize("logits", ["mean", "probs"])
def test_oneshot_lsq_merge_from_client_sums_equals_the_local_lsq_merge_on_pooled_data(logits):
    """repair="lsq" through Flower: one QUERY round per round of fits plus one of BatchNorm moments, the
    clients answering with G/H sums; the result is the local lsq merge on all clients' batches. With
    lsq_logits="probs" the clients form the head's target from the averaged probabilities, as the server
    asked (a client that kept "mean" would send other sums, and the merges would differ)."""
    got = {}

    def keep(merged, report, models):
        got.update(merged=merged, report=report, models=models)

    app = oneshot_server_app(_model, example=torch.zeros(1, 1, 16, 16), min_nodes=CLIENTS, repair="lsq",
                             train_config={"epochs": 1}, on_merged=keep, merge_kwargs={"lsq_logits": logits})
    run_inprocess(app, client_app(_model, _data, _train), CLIENTS)
    models, rep = got["models"], got["report"]
    pooled = [b for i in range(CLIENTS) for b in _partition(i)[0].split(100)]
    ref, ref_rep = merge_many(models, pooled, weights=rep.weights, repair="lsq", progress=False, return_report=True,
                              lsq_logits=logits)
    assert rep.calibration_samples == ref_rep.calibration_samples == 1347
    assert rep.lsq_round_bytes == ref_rep.lsq_round_bytes and len(rep.lsq_round_bytes) == 7  # 6 fit rounds + moments
    fits = [s for s in rep.sites.values() if s.residual_after is not None]
    assert len(fits) == 7 and all(s.residual_after < s.residual_before for s in fits)
    merged = got["merged"].state_dict()
    # the same float64 sums added client by client instead of batch by batch: equal up to float32 rounding
    for k, v in ref.state_dict().items():
        assert torch.allclose(merged[k].double(), v.double(), rtol=1e-5, atol=1e-6), k


@pytest.mark.slow
def test_aligned_fedavg_offers_lsq():
    strategy = AlignedFedAvg(_model, method="activation", repair="lsq", example=torch.zeros(1, 1, 16, 16),
                             fraction_evaluate=0.0, min_train_nodes=CLIENTS, min_available_nodes=CLIENTS)
    app = ServerApp()

    @app.main()
    def main(grid, context):
        torch.manual_seed(0)
        strategy.start(grid, ArrayRecord.from_torch_state_dict(_model().state_dict()), num_rounds=1,
                       train_config=ConfigRecord({"epochs": 1}))

    run_inprocess(app, client_app(_model, _data, _train), CLIENTS)
    rep = strategy.reports[1]
    assert rep.repair == "lsq" and rep.calibration_samples == 1347 and len(rep.lsq_round_bytes) == 7
    assert rep.weights[0] == 0.0  # the global model only sets the channel order: not an endpoint of the walk
    assert all(s.residual_after <= s.residual_before for s in rep.sites.values() if s.residual_after is not None)


def test_a_client_whose_graph_gives_other_rounds_names_the_mismatch():
    from mergekit_vision.engine import shared_graph
    from mergekit_vision.errors import DataError
    from mergekit_vision.recipes.flower import FlowerCollector
    from mergekit_vision.repair.lsq import find_lsq_sites

    app, seen = ServerApp(), {}

    @app.main()
    def main(grid, context):
        m = _model().eval()
        gm = shared_graph(m)
        sites, _ = find_lsq_sites(gm)
        with pytest.raises(DataError) as err:  # the server leaves out the stem: its round 0 is another layer
            FlowerCollector(grid).lsq(m, [m], [1.0], gm, sites[1:], ridge=1e-3, positions=8, seed=0)
        seen["error"] = str(err.value)

    run_inprocess(app, client_app(_model, _data, _train), 2)
    assert "none of 2 clients answered" in seen["error"] and "answer_lsq_query" in seen["error"]
    assert ("least-squares round 0 (fit): the server fits 'layer1_0_norm1', this client's graph gives 'norm1'"
            in seen["error"]), seen["error"]
    assert "same architecture" in seen["error"]


def test_a_client_without_the_statistics_handler_gets_a_clear_error():
    from flwr.clientapp import ClientApp

    from mergekit_vision.errors import DataError
    from mergekit_vision.merge_many import StatisticsRequest, plan_calibration
    from mergekit_vision.recipes.flower import FlowerCollector

    app, seen = ServerApp(), {}

    @app.main()
    def main(grid, context):
        m = _model().eval()
        plan = plan_calibration(m, torch.zeros(1, 1, 16, 16))
        with pytest.raises(DataError, match="answer_statistics_query") as err:
            FlowerCollector(grid)([m, m], plan, StatisticsRequest(pairs=((0, 1),)))
        seen["error"] = str(err.value)

    run_inprocess(app, ClientApp(), 2)  # a ClientApp that registers nothing
    assert "none of 2 clients answered" in seen["error"]


def test_statistics_request_travels_with_its_tap_policy():
    from mergekit_vision.merge_many import StatisticsRequest, plan_calibration
    from mergekit_vision.recipes.flower import _parse_request, _request_content

    models = [_model(), _model()]
    plan = plan_calibration(models[0], torch.randn(1, 1, 8, 8))
    req = StatisticsRequest(pairs=((0, 1),), sites=True, taps="blocks", max_batches=3)
    n, mode, back = _parse_request(_request_content(models, plan, req))
    assert (n, mode, back.pairs, back.sites, back.taps, back.max_batches) == \
        (2, plan.mode, ((0, 1),), True, "blocks", 3)


def test_statistics_request_travels_with_aligned_permutations_and_affines():
    from mergekit_vision.merge_many import StatisticsRequest, plan_calibration
    from mergekit_vision.recipes.flower import _parse_request, _request_content

    models = [_model(), _model()]
    plan = plan_calibration(models[0], torch.randn(1, 1, 8, 8))
    perm = torch.randperm(8)
    req = StatisticsRequest(pairs=((0, 1),), aligned={1: {"layer/0": perm}},
                            affines={"add": (torch.rand(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64))})
    _, _, back = _parse_request(_request_content(models, plan, req))
    assert list(back.aligned) == [1] and torch.equal(back.aligned[1]["layer/0"], perm)
    assert all(torch.equal(x, y) for x, y in zip(back.affines["add"], req.affines["add"]))
