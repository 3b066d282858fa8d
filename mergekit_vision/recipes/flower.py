"""Flower (flwr >= 1.42, Message API): client models aligned, averaged and REPAIRed on the server.

Server: :class:`AlignedFedAvg` (a FedAvg whose ``aggregate_train`` merges the replies with
:func:`~mergekit_vision.merge_many.merge_many`) and :func:`oneshot_server_app` (one round of training
from independent inits, then one merge). The statistics a merge needs are asked from the clients in
QUERY rounds (message type ``"query.merge_statistics"``): each answers with float64 sums over its data,
never the data. ``repair="lsq"`` asks one more QUERY round (``"query.lsq_statistics"``) per round of
least-squares fits, and one for the BatchNorms' moments: each client runs its data through the
aligned endpoints and the merged net as fitted so far and answers with the round's least-squares
statistics (centred moments).
Client: :func:`answer_statistics_query` and :func:`answer_lsq_query` (register them in your own
ClientApp) or :func:`client_app` (a complete one). :func:`run_inprocess` runs a ServerApp with a ClientApp in this
process through Flower's own message serializer, for tests and machines without Ray.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, \
        RecordDict
    from flwr.clientapp import ClientApp
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("mergekit_vision.recipes.flower needs Flower >= 1.42: "
                      "pip install 'mergekit-vision[federated]'") from exc

from ..calibration import CalibrationPlan, Statistics, StatisticsRequest, collect_statistics, plan_calibration
from ..data import check_reiterable, iter_inputs
from ..engine import shared_graph
from ..errors import ConfigError, DataError, MergeVisionError
from ..merge import merge_many
from ..repair import Target
from ..repair.lsq import (LsqResult, LsqRound, LsqSite, find_lsq_sites, logit_sites, lsq_moments, lsq_pass,
                          lsq_rounds)
from ..report import MergeReport

__all__ = ["STATISTICS_MESSAGE_TYPE", "LSQ_MESSAGE_TYPE", "FlowerCollector", "AlignedFedAvg", "oneshot_server_app",
           "answer_statistics_query", "answer_lsq_query", "client_app", "run_inprocess", "InProcessGrid",
           "state_dict_of"]

logger = logging.getLogger(__name__)

STATISTICS_MESSAGE_TYPE = f"{MessageType.QUERY}.merge_statistics"
LSQ_MESSAGE_TYPE = f"{MessageType.QUERY}.lsq_statistics"
ModelFn = Callable[[], nn.Module]


def state_dict_of(record: ArrayRecord) -> Dict[str, torch.Tensor]:
    """An ArrayRecord as a torch state dict (tensors that own their memory)."""
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def _load(model_fn: ModelFn, record: ArrayRecord) -> nn.Module:
    model = model_fn()
    model.load_state_dict(state_dict_of(record))
    return model.eval()


def _record(model: nn.Module) -> ArrayRecord:
    return ArrayRecord.from_torch_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})


# ---- a statistics round: the request out, float64 sums back -------------------------------
def _request_content(models: Sequence[nn.Module], plan: CalibrationPlan, request: StatisticsRequest) -> RecordDict:
    content = RecordDict({f"model.{i}": _record(m) for i, m in enumerate(models)})
    content["config"] = ConfigRecord({
        "num-models": len(models),
        "pairs": ";".join(f"{i},{j}" for i, j in request.pairs),
        "sites": bool(request.sites),
        "correction": bool(request.correction),
        "mode": plan.mode,
        "max-batches": int(request.max_batches or 0),
        "taps": request.taps,
        "tap-positions": int(request.tap_positions or 0),
    })
    if request.targets:
        content["targets"] = ArrayRecord.from_torch_state_dict(
            {f"{node}/{f}": getattr(t, f).detach().cpu().double() for node, t in request.targets.items()
             for f in ("mean", "std")})
    if request.aligned:  # the crossed-tap pass: each model's permutations, "model/group" -> int64 indices
        content["aligned"] = ArrayRecord.from_torch_state_dict(
            {f"{k}/{g}": p.detach().cpu() for k, perms in request.aligned.items() for g, p in perms.items()})
    if request.affines:  # explicit stream corrections, for the diagnostic pass
        content["affines"] = ArrayRecord.from_torch_state_dict(
            {f"{node}/{f}": t.detach().cpu().double() for node, ts in request.affines.items()
             for f, t in zip(("scale", "shift"), ts)})
    return content


def _parse_request(content: RecordDict) -> Tuple[int, str, StatisticsRequest]:
    cfg = content["config"]
    pairs = tuple(tuple(int(v) for v in p.split(",")) for p in str(cfg["pairs"]).split(";") if p)
    targets = None
    if "targets" in content.array_records:
        t = content["targets"].to_torch_state_dict()
        targets = {k[:-len("/mean")]: Target(v, t[k[:-len("/mean")] + "/std"]) for k, v in t.items()
                   if k.endswith("/mean")}
    aligned = None
    if "aligned" in content.array_records:
        aligned = {}
        for key, p in content["aligned"].to_torch_state_dict().items():
            k, _, g = key.partition("/")  # group names may hold '/'; the model index never does
            aligned.setdefault(int(k), {})[g] = p.clone().long()
    affines = None
    if "affines" in content.array_records:
        t = content["affines"].to_torch_state_dict()
        affines = {k[:-len("/scale")]: (v, t[k[:-len("/scale")] + "/shift"]) for k, v in t.items()
                   if k.endswith("/scale")}
    req = StatisticsRequest(pairs=pairs, sites=bool(cfg["sites"]), correction=bool(cfg["correction"]),
                            targets=targets, max_batches=int(cfg["max-batches"]) or None,
                            taps=str(cfg["taps"]) if "taps" in cfg else "all", aligned=aligned, affines=affines,
                            tap_positions=int(cfg["tap-positions"]) or None if "tap-positions" in cfg else None)
    return int(cfg["num-models"]), str(cfg["mode"]), req


def answer_statistics_query(message: Message, context: Context, *, model_fn: ModelFn, data: Any,
                            max_batches: Optional[int] = None, device: Any = None) -> Message:
    """A client's reply to a ``"query.merge_statistics"`` message: the sums the server asked for, over
    ``data`` (any re-iterable of input batches), in one ArrayRecord ``"statistics"`` plus a
    MetricRecord ``{"num-examples": n}``. ``model_fn()`` builds a fresh model of the architecture."""
    check_reiterable(data, "data")  # one batch traces, the pass reads them all
    n, mode, req = _parse_request(message.content)
    models = [_load(model_fn, message.content[f"model.{i}"]) for i in range(n)]
    example = next(iter_inputs(data, max_batches=1))[:1]
    plan = plan_calibration(models[0], example, repair=mode)  # deterministic: the server's plan
    st = collect_statistics(models, data, plan, req, max_batches=max_batches, device=device)
    reply = RecordDict({
        "statistics": ArrayRecord.from_torch_state_dict({k: v.cpu() for k, v in st.as_tensors().items()}),
        "metrics": MetricRecord({"num-examples": int(st.samples)}),
    })
    return Message(reply, reply_to=message)


class _RoundDone(Exception):
    """Raised by a client's reduce: the walk has this round's statistics and stops there."""


def answer_lsq_query(message: Message, context: Context, *, model_fn: ModelFn, data: Any,
                     max_batches: Optional[int] = None, device: Any = None) -> Message:
    """A client's reply to a ``"query.lsq_statistics"`` message: one round of the least-squares walk
    on ``data``. The message holds the aligned endpoints (``model.i``), the merged net as fitted so far
    (``merged``) and the round; the client runs its batches through them up to the round's fits and
    answers with their float64 sums (:class:`~mergekit_vision.repair.lsq.LsqRound`, ArrayRecord
    ``"statistics"``), or, in the last round, the BatchNorms' output moments; never the data. Stateless:
    each round is walked from the inputs again."""
    check_reiterable(data, "data")
    cfg = message.content["config"]
    endpoints = [_load(model_fn, message.content[f"model.{i}"]) for i in range(int(cfg["num-models"]))]
    merged = _load(model_fn, message.content["merged"])
    if device is not None:
        endpoints, merged = [m.to(device) for m in endpoints], merged.to(device)
    p0 = next(iter(merged.parameters()))
    batches = list(iter_inputs(data, max_batches=max_batches, device=p0.device, dtype=p0.dtype))
    # deterministic: the server's graph, sites and rounds (traced at the data's size, as the server's)
    gm = shared_graph(merged, input_shape=tuple(batches[0].shape[1:]) if batches else None)
    sites, _ = find_lsq_sites(gm)
    sites = logit_sites(sites, gm, str(cfg["logits"]) if "logits" in cfg else "mean")  # the server's targets
    rounds = lsq_rounds(gm.graph, sites)
    r, kind = int(cfg["round"]), str(cfg["kind"])
    if kind == "moments" and r == len(rounds):
        rnd = lsq_moments(merged, gm, sites, batches, r)
    else:
        mine = ";".join(sorted(s.value for s in rounds[r])) if kind == "fit" and 0 <= r < len(rounds) else None
        if mine != str(cfg["fits"]):
            raise DataError(f"least-squares round {r} ({kind}): the server fits {cfg['fits']!r}, this client's graph "
                            f"gives {mine!r} ({len(rounds)} rounds): server and clients must build the same "
                            "architecture (model_fn)")
        got: Dict[str, LsqRound] = {}

        def stop(rnd: LsqRound) -> LsqRound:
            got["round"] = rnd
            raise _RoundDone

        try:
            lsq_pass(merged, endpoints, [float(w) for w in cfg["weights"]], gm, batches,
                     positions=int(cfg["positions"]) or None, seed=int(cfg["seed"]),
                     sites=[s for rs in rounds[r:] for s in rs], reduce=stop)
        except _RoundDone:
            pass
        rnd = got["round"]
        rnd.index = r  # the walk counted from this round
    reply = RecordDict({
        "statistics": ArrayRecord.from_torch_state_dict({k: v.cpu() for k, v in rnd.as_tensors().items()}),
        "metrics": MetricRecord({"num-examples": int(rnd.samples)}),
    })
    return Message(reply, reply_to=message)


class FlowerCollector:
    """A ``collect`` for :func:`merge_many` that asks Flower clients for the statistics (one QUERY
    round per pass; ``repair="lsq"``: one per round of fits too, :meth:`lsq`) and sums their replies.
    ``node_ids``: the clients to ask (default: all); ``rounds``: QUERY rounds asked so far."""

    def __init__(self, grid: Grid, node_ids: Optional[Iterable[int]] = None, *, timeout: Optional[float] = None,
                 group_id: str = "merge-statistics"):
        self.grid = grid
        self.node_ids = None if node_ids is None else list(node_ids)
        self.timeout = timeout
        self.group_id = group_id
        self.rounds = 0

    def __call__(self, models: List[nn.Module], plan: CalibrationPlan, request: StatisticsRequest) -> Statistics:
        replies = self._ask(_request_content(models, plan, request), STATISTICS_MESSAGE_TYPE, "answer_statistics_query")
        return sum(Statistics.from_tensors(r.content["statistics"].to_torch_state_dict()) for r in replies)

    def lsq(self, merged: nn.Module, endpoints: Sequence[nn.Module], weights: Sequence[float], gm: Any,
            sites: List[LsqSite], *, ridge: float, positions: Optional[int], seed: int,
            memory: Union[int, str, None] = None) -> LsqResult:
        """``repair="lsq"``: the least-squares walk on the server, without data: each round's statistics
        are the clients' sums, asked in one ``"query.lsq_statistics"`` round that carries the aligned
        endpoints and the merged net as fitted so far (clients keep nothing between rounds). ``memory``
        (``lsq_memory``) is accepted for the collector interface: the server holds no activations."""
        ends = [_record(m) for m in endpoints]
        n_rounds = len(lsq_rounds(gm.graph, sites))
        logits = next((s.target for s in sites if s.target != "mean"), "mean")  # lsq_logits, for the clients
        dev = next(iter(merged.parameters())).device  # the sums are solved and folded where the merged net is

        def reduce(rnd: LsqRound) -> LsqRound:
            content = RecordDict({f"model.{i}": r for i, r in enumerate(ends)})
            content["merged"] = _record(merged)
            content["config"] = ConfigRecord({
                "num-models": len(ends), "weights": [float(w) for w in weights], "round": rnd.index,
                "kind": "moments" if rnd.index == n_rounds else "fit", "fits": ";".join(sorted(rnd.fits)),
                "positions": int(positions or 0), "seed": int(seed), "logits": logits})
            pooled = None
            for r in self._ask(content, LSQ_MESSAGE_TYPE, "answer_lsq_query"):
                sums = r.content["statistics"].to_torch_state_dict()
                part = LsqRound.from_tensors({k: v.to(dev) for k, v in sums.items()})
                pooled = part if pooled is None else pooled + part
            return pooled

        return lsq_pass(merged, endpoints, weights, gm, [], ridge=ridge, positions=positions, seed=seed, sites=sites,
                        reduce=reduce)

    def _ask(self, content: RecordDict, message_type: str, handler: str) -> List[Message]:
        """One QUERY round: ``content`` to every client, the replies without errors (at least one)."""
        ids = self.node_ids if self.node_ids is not None else list(self.grid.get_node_ids())
        self.rounds += 1
        msgs = [Message(content, dst_node_id=nid, message_type=message_type,
                        group_id=f"{self.group_id}-{self.rounds}") for nid in ids]
        replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout))
        ok = [r for r in replies if not r.has_error()]
        for r in replies:
            if r.has_error():
                logger.warning("statistics query: node %d answered with an error: %s", r.metadata.src_node_id,
                               r.error.reason)
        if not ok:
            reasons = sorted({r.error.reason for r in replies if r.has_error()})
            raise DataError(f"statistics query: none of {len(ids)} clients answered ({len(replies)} replies, all "
                            f"errors). The ClientApp must register {handler} for {message_type!r} "
                            "(mergekit_vision.recipes.flower.client_app does)"
                            + (f"; the clients said: {'; '.join(reasons[:3])}" if reasons else ""))
        if len(ok) < len(ids):
            logger.warning("statistics query: %d of %d clients answered; pooling those", len(ok), len(ids))
        return ok


# ---- the strategy: FedAvg with aligned (and REPAIRed) averaging -------------------------------
class AlignedFedAvg(FedAvg):
    """FedAvg whose aggregation aligns the client models before averaging them (and corrects the average).

    ``model_fn()`` builds the architecture. ``reference="global"`` aligns every client to the global
    model it started from (weight 0: the global model only sets the channel order, so rounds stay in
    one coordinate system); ``"first"`` to the first reply. Statistics come from ``calib_loader``
    (server-side data) when given, else from the replying clients in QUERY rounds; ``method="weight"``
    with ``repair=False`` needs no data at all. ``example``: an input batch to trace the model with
    (needed without ``calib_loader``). ``merge_kwargs`` go to :func:`merge_many`. Reports land in
    ``self.reports[server_round]``; the aggregated train metrics gain ``"align-moved"`` (largest fraction
    of channels any client's assignment moved) and ``"align-near-identity"`` (1 when nothing moved).

    ``repair="lsq"`` refits every layer by least squares from the clients' pooled statistics (one
    ``"query.lsq_statistics"`` round per round of fits, see :meth:`FlowerCollector.lsq`).
    ``repair`` defaults to ``"reset"`` (BatchNorm statistics re-estimated on the clients' data): for
    clients of one global model it is what helped in docs/recipes/fedavg_align.md. Clients of one
    global model share its channel order, so ``merge_many``'s lineage test (``lineage_threshold``, via
    ``merge_kwargs``) normally skips the matching and reports ``align-near-identity`` = 1.

    Flower's FedAvg checks that every train reply holds exactly one ArrayRecord and one MetricRecord
    carrying ``weighted_by_key``; that check runs here too, which is why the statistics travel in
    separate QUERY messages rather than as extra records of the train replies.
    """

    def __init__(self, model_fn: ModelFn, *, method: str = "activation", repair: Any = "reset",
                 iterations: Optional[int] = None,
                 reference: str = "global", calib_loader: Any = None, example: Optional[torch.Tensor] = None,
                 query_timeout: Optional[float] = None, merge_kwargs: Optional[Mapping[str, Any]] = None,
                 **fedavg_kwargs: Any):
        super().__init__(**fedavg_kwargs)
        if reference not in ("global", "first"):
            raise ConfigError(f"reference must be 'global' or 'first', got {reference!r}")
        if calib_loader is None and example is None:
            raise ConfigError("AlignedFedAvg traces the model on an input batch: pass example= (e.g. "
                              "torch.zeros(1, 3, 32, 32)) or calib_loader=")
        self.model_fn = model_fn
        self.method, self.repair, self.iterations, self.reference = method, repair, iterations, reference
        self.calib_loader, self.example, self.query_timeout = calib_loader, example, query_timeout
        self.merge_kwargs = dict(merge_kwargs or {})
        self.reports: Dict[int, MergeReport] = {}
        self._grid: Optional[Grid] = None
        self._global: Optional[ArrayRecord] = None

    def summary(self) -> None:
        super().summary()
        logger.info("aligned averaging: method=%s repair=%s iterations=%s reference=%s", self.method, self.repair,
                    self.iterations, self.reference)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self._grid, self._global = grid, arrays  # aggregate_train gets neither
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        models = [_load(self.model_fn, next(iter(c.array_records.values()))) for c in contents]
        weights = [float(next(iter(c.metric_records.values()))[self.weighted_by_key]) for c in contents]
        reference = 0
        if self.reference == "global" and self._global is not None:
            models = [_load(self.model_fn, self._global)] + models
            weights = [0.0] + weights
        collect = None
        if self.calib_loader is None:
            collect = FlowerCollector(self._grid, [m.metadata.src_node_id for m in valid], timeout=self.query_timeout)
        kw = {"progress": False, **self.merge_kwargs}
        merged, report = merge_many(models, self.calib_loader, weights=weights, method=self.method,
                                    reference=reference, iterations=self.iterations, repair=self.repair,
                                    collect=collect, example=self.example, return_report=True, **kw)
        self.reports[server_round] = report
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        moved = report.moved()[1:] if self.reference == "global" and self._global is not None else report.moved()
        metrics["align-moved"] = float(max(moved) if moved else 0.0)
        metrics["align-near-identity"] = int(bool(report.near_identity))
        return _record(merged), metrics


# ---- one-shot: independent training, one merge -------------------------------------------
def oneshot_server_app(model_fn: ModelFn, *, example: torch.Tensor, min_nodes: int = 2, method: str = "activation",
                       repair: Any = True, iterations: Optional[int] = None, weighted_by_key: str = "num-examples",
                       train_config: Optional[Mapping[str, Any]] = None, timeout: Optional[float] = None,
                       on_merged: Optional[Callable[[nn.Module, MergeReport, List[nn.Module]], None]] = None,
                       merge_kwargs: Optional[Mapping[str, Any]] = None) -> ServerApp:
    """A ServerApp for one-shot federated learning: every client trains from its own initialization
    (train messages carry no ArrayRecord, only a config with ``"init-seed"``), then the server merges the
    replies with :func:`merge_many`, weighted by ``weighted_by_key``, asking the clients for the
    statistics (``repair="lsq"``: also one QUERY round per round of least-squares fits). The merged model
    is stored in the server context's ``state["merged"]`` (ArrayRecord) and passed to
    ``on_merged(merged, report, client_models)``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        while len(ids := sorted(grid.get_node_ids())) < min_nodes:
            logger.info("one-shot merge: waiting for %d nodes (%d connected)", min_nodes, len(ids))
            time.sleep(1.0)
        msgs = [Message(RecordDict({"config": ConfigRecord({**dict(train_config or {}), "server-round": 1,
                                                            "init-seed": i})}),
                        dst_node_id=nid, message_type=MessageType.TRAIN, group_id="oneshot-train")
                for i, nid in enumerate(ids)]
        replies = [r for r in grid.send_and_receive(msgs, timeout=timeout) if not r.has_error()]
        if not replies:
            raise MergeVisionError("one-shot merge: no client returned a trained model")
        validate_message_reply_consistency([r.content for r in replies], weighted_by_key, check_arrayrecord=True)
        models = [_load(model_fn, next(iter(r.content.array_records.values()))) for r in replies]
        weights = [float(next(iter(r.content.metric_records.values()))[weighted_by_key]) for r in replies]
        collect = FlowerCollector(grid, [r.metadata.src_node_id for r in replies], timeout=timeout)
        merged, report = merge_many(models, weights=weights, method=method, iterations=iterations, repair=repair,
                                    collect=collect, example=example, return_report=True,
                                    **{"progress": False, **dict(merge_kwargs or {})})
        logger.info("one-shot merge of %d clients (%d statistics rounds):\n%s", len(models), collect.rounds,
                    report.summary())
        context.state["merged"] = _record(merged)
        context.state["merge-report"] = ConfigRecord({"json": report.to_json()})
        if on_merged is not None:
            on_merged(merged, report, models)

    return app


# ---- the client side ----------------------------------------------------------------------
def client_app(model_fn: ModelFn, data_fn: Callable[[Context], Tuple[Any, Any]],
               train_fn: Callable[[nn.Module, Any, Dict[str, Any]], Optional[Dict[str, float]]],
               *, evaluate_fn: Optional[Callable[[nn.Module, Any], Dict[str, float]]] = None) -> ClientApp:
    """A ClientApp that trains, answers statistics queries and (with ``evaluate_fn``) evaluates.

    ``data_fn(context) -> (train_data, calib_data)`` for this node (``context.node_config
    ["partition-id"]``); ``train_fn(model, train_data, config) -> metrics`` trains in place (a
    ``"num-examples"`` metric overrides ``len(train_data)``). Train messages without an ArrayRecord
    start from a fresh model seeded with ``config["init-seed"]`` (one-shot federated learning).
    """
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        train_data, _ = data_fn(context)
        cfg = dict(msg.content["config"]) if "config" in msg.content.config_records else {}
        if msg.content.array_records:
            model = _load(model_fn, next(iter(msg.content.array_records.values())))
        else:
            torch.manual_seed(int(cfg.get("init-seed", context.node_id)))
            model = model_fn()
        metrics = dict(train_fn(model, train_data, cfg) or {})
        metrics.setdefault("num-examples", len(train_data))
        return Message(RecordDict({"arrays": _record(model.eval()), "metrics": MetricRecord(metrics)}),
                       reply_to=msg)

    @app.query("merge_statistics")
    def statistics(msg: Message, context: Context) -> Message:
        _, calib = data_fn(context)
        return answer_statistics_query(msg, context, model_fn=model_fn, data=calib)

    @app.query("lsq_statistics")
    def lsq_statistics(msg: Message, context: Context) -> Message:
        _, calib = data_fn(context)
        return answer_lsq_query(msg, context, model_fn=model_fn, data=calib)

    if evaluate_fn is not None:
        @app.evaluate()
        def evaluate(msg: Message, context: Context) -> Message:
            train_data, _ = data_fn(context)
            model = _load(model_fn, next(iter(msg.content.array_records.values())))
            metrics = dict(evaluate_fn(model, train_data))
            metrics.setdefault("num-examples", len(train_data))
            return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


# ---- running a ServerApp and a ClientApp in this process ------------------------------------
class InProcessGrid(Grid):
    """A Grid that delivers each message to the ClientApp right away, in this process, one node after
    the other. Every message and reply goes through Flower's protobuf serializer, as over the wire, so
    a payload Flower cannot transport fails here too and no object is shared between server and client."""

    def __init__(self, client: ClientApp, contexts: Mapping[int, Context]):
        self.client = client
        self.contexts = dict(contexts)
        self._run = None
        self._replies: Dict[str, Message] = {}

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        from flwr.common.constant import ErrorCode

        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            if msg.metadata.dst_node_id not in self.contexts:
                raise ConfigError(f"message to unknown node {msg.metadata.dst_node_id}; nodes: {sorted(self.contexts)}")
            delivered = message_from_proto(message_to_proto(msg))
            try:
                reply = self.client(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # reported as an error reply, as Flower's runtime does
                logger.exception("ClientApp raised on node %d", msg.metadata.dst_node_id)
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}")
                reply = Message(error, reply_to=delivered)
            reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self._replies[msg.metadata.message_id] = message_from_proto(message_to_proto(reply))
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: Optional[float] = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(server_app: ServerApp, client: ClientApp, num_supernodes: int, *,
                  run_config: Optional[Mapping[str, Any]] = None, run_id: int = 1) -> Context:
    """Run ``server_app`` against ``num_supernodes`` virtual nodes running ``client``, sequentially in this
    process (no Ray; Flower's ``run_simulation`` needs ``flwr[simulation]``). Node ``i`` gets
    ``node_config={"partition-id": i, "num-partitions": num_supernodes}``. Returns the server's context."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity

    if num_supernodes < 1:
        raise ConfigError(f"num_supernodes must be >= 1, got {num_supernodes}")
    cfg = dict(run_config or {})
    contexts = {1000 + i: Context(run_id=run_id, node_id=1000 + i,
                                  node_config={"partition-id": i, "num-partitions": num_supernodes},
                                  state=RecordDict(), run_config=dict(cfg)) for i in range(num_supernodes)}
    grid = InProcessGrid(client, contexts)
    grid.set_run(Run.create_empty(run_id=run_id))
    # the identity Flower stamps on messages the server creates (run_simulation sets the same)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 1
    context = Context(run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config=cfg)
    server_app(grid, context)
    return context
