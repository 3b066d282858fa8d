"""The merge options, validated once into a frozen object; the registries of matchers and repair modes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

from .errors import ConfigError
from .match import LINEAGE_THRESHOLD, TAP_POLICIES, WEIGHT_TOL
from .repair.lsq import LSQ_LOGITS


@dataclass(frozen=True)
class Matcher:
    """How channels of a model are put into the reference's order."""

    name: str
    needs_data: bool  # correlations of activations (calibration data), or weights alone
    doc: str


@dataclass(frozen=True)
class RepairMode:
    """What the correction pass after averaging does."""

    name: str
    sites: str           # which sites find_sites returns ("repair", "reset", "stream"); "" for none
    needs_targets: bool  # the endpoints' statistics are measured: targets sum_k w_k stat_k
    doc: str


MATCHERS: Dict[str, Matcher] = {m.name: m for m in (
    Matcher("activation", True, "correlate the models' channels at the taps, then assign"),
    Matcher("weight", False, "weight matching (Git Re-Basin), data-free"),
    Matcher("none", False, "no alignment: the naive average"),
)}
REPAIRS: Dict[str, RepairMode] = {r.name: r for r in (
    RepairMode("repair", "repair", True, "renormalize every BatchNorm and unnormalized conv/linear output"),
    RepairMode("reset", "reset", False, "re-estimate BatchNorm statistics only (RESET)"),
    RepairMode("stream", "stream", True, "as repair, plus a correction on every residual add"),
    RepairMode("lsq", "repair", True, "refit every conv/linear layer (and its BatchNorm) by least squares to "
               "the interpolated endpoints' values, layer after layer on the merged net's own inputs"),
    RepairMode("none", "", False, "no correction"),
)}
METHODS: Tuple[str, ...] = tuple(MATCHERS)
REPAIR_MODES: Tuple[str, ...] = tuple(REPAIRS)


def lookup(table: Dict[str, Any], name: Any, what: str, extra: str = "") -> Any:
    """``table[name]``, or a ConfigError that lists the valid names."""
    try:
        return table[name]
    except (KeyError, TypeError):
        raise ConfigError(f"unknown {what} {name!r}; valid: {', '.join(table)}{extra}") from None


def repair_mode(repair: Union[bool, str, None]) -> str:
    """True/False/None or a mode name -> the mode name."""
    if repair is True:
        return "repair"
    if repair in (False, None):
        return "none"
    return lookup(REPAIRS, repair, "repair mode", " (or True/False)").name


def check_lsq_memory(memory: Any) -> None:
    """``lsq_memory``: None, "auto", an int of bytes >= 0 or a size string ("4GB"); ConfigError otherwise."""
    if memory is None or (isinstance(memory, str) and memory.strip().lower() == "auto"):
        return
    if isinstance(memory, int) and not isinstance(memory, bool) and memory >= 0:
        return
    if isinstance(memory, str):
        from .export.files import parse_size

        try:
            parse_size(memory)
            return
        except ConfigError:
            pass
    raise ConfigError(f"lsq_memory must be 'auto' (half the memory available), None (no limit), an int of bytes "
                      f">= 0 or a size like '4GB': the memory least-squares repair holds activations in before "
                      f"spilling them to TMPDIR; got {memory!r}")


@dataclass(frozen=True)
class MergeOptions:
    """Every option of a merge, checked once (:meth:`create`); the stages read them from here."""

    method: str = "activation"
    repair: str = "repair"
    iterations: int = 0
    max_batches: Optional[int] = None
    max_samples: Optional[int] = None
    progress: bool = True
    leaf_modules: Tuple[Any, ...] = ()
    weight_iters: int = 100
    weight_tol: float = WEIGHT_TOL
    seed: int = 0
    diagnostic_batches: int = 1
    fold_stream: bool = True
    lineage_threshold: Optional[float] = LINEAGE_THRESHOLD
    taps: str = "all"
    tap_positions: Optional[int] = None
    lsq_ridge: float = 1e-3
    lsq_positions: Optional[int] = 64
    lsq_memory: Union[int, str, None] = "auto"
    lsq_logits: str = "mean"
    rotate_stream: bool = False

    @classmethod
    def create(cls, *, repair: Union[bool, str, None] = True, **kwargs) -> MergeOptions:
        opts = cls(repair=repair_mode(repair), **{k: tuple(v) if k == "leaf_modules" else v
                                                  for k, v in kwargs.items()})
        lookup(MATCHERS, opts.method, "method")
        lookup({t: t for t in TAP_POLICIES}, opts.taps, "taps")
        wt = opts.weight_tol
        if isinstance(wt, bool) or not isinstance(wt, (int, float)) or not wt >= 0:
            raise ConfigError(f"weight_tol must be a number >= 0 (0: run weight matching to a fixed point), "
                              f"got {wt!r}")
        lr = opts.lsq_ridge
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 <= lr < float("inf"):
            raise ConfigError(f"lsq_ridge must be a finite number >= 0 (the ridge strength relative to the mean "
                              f"diagonal of each layer's Gram matrix; default 1e-3), got {lr!r}")
        tp = opts.tap_positions
        if tp is not None and (isinstance(tp, bool) or not isinstance(tp, int) or tp < 1):
            raise ConfigError(f"tap_positions must be an int >= 1 (positions per image each matching tap's "
                              f"cross-moments read) or None (every position), got {tp!r}")
        lp = opts.lsq_positions
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or lp < 1):
            raise ConfigError(f"lsq_positions must be an int >= 1 (output positions per image used by each "
                              f"least-squares fit) or None (every position), got {lp!r}")
        check_lsq_memory(opts.lsq_memory)
        lookup({t: t for t in LSQ_LOGITS}, opts.lsq_logits, "lsq_logits")
        if not isinstance(opts.rotate_stream, bool):
            raise ConfigError(f"rotate_stream must be True or False, got {opts.rotate_stream!r}")
        if opts.rotate_stream and opts.method != "activation":
            raise ConfigError(f"rotate_stream=True rotates residual streams by the activations' cross-moments, "
                              f"which method={opts.method!r} does not measure: use method='activation'")
        it = opts.iterations
        if isinstance(it, bool) or not isinstance(it, int) or it < 0:
            raise ConfigError(f"iterations must be an int >= 0 (0: star alignment), got {it!r}")
        return opts

    @property
    def matcher(self) -> Matcher:
        return MATCHERS[self.method]

    @property
    def mode(self) -> RepairMode:
        return REPAIRS[self.repair]

    @property
    def needs_data(self) -> bool:
        return self.matcher.needs_data or self.repair != "none"
