"""Stage 4: REPAIR the interpolated network's statistics and fuse the corrections into its weights."""
from .correct import (ChannelAffine, CorrectionPass, Target, affine_correction, foldable_addends, fuse_affine,
                      fuse_bn_correction, fuse_reset, interpolate_targets, repair_targets)
from .fuse import fuse_corrections, with_affines
from .sites import Site, find_sites, permute_channel_stats

__all__ = ["ChannelAffine", "CorrectionPass", "Target", "affine_correction", "foldable_addends", "fuse_affine",
           "fuse_bn_correction", "fuse_reset", "interpolate_targets", "repair_targets", "fuse_corrections",
           "with_affines", "Site", "find_sites", "permute_channel_stats"]
