"""Stage 4: REPAIR the interpolated network's statistics and fuse the corrections into its weights."""
from .correct import (CorrectionPass, Target, affine_correction, fuse_affine, fuse_bn_correction, fuse_reset,
                      interpolate_targets)
from .sites import Site, find_sites, permute_channel_stats

__all__ = ["CorrectionPass", "Target", "affine_correction", "fuse_affine", "fuse_bn_correction", "fuse_reset",
           "interpolate_targets", "Site", "find_sites", "permute_channel_stats"]
