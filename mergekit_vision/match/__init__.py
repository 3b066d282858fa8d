"""Stage 2: match model B's channels to model A's (activation correlation or weight matching)."""
from .activation import TAP_POLICIES, PairCollector, match_from_correlations, select_taps
from .assignment import solve_assignment
from .lineage import LINEAGE_THRESHOLD, lineage_cosine, lineage_groups, lineage_keys, shared_lineage, weight_cosines
from .stats import ChannelMoments, CrossMoments
from .weight import WEIGHT_TOL, match_weights

__all__ = ["TAP_POLICIES", "PairCollector", "match_from_correlations", "select_taps", "solve_assignment",
           "ChannelMoments", "CrossMoments", "match_weights", "WEIGHT_TOL", "LINEAGE_THRESHOLD", "lineage_cosine",
           "lineage_groups", "lineage_keys", "shared_lineage", "weight_cosines"]
