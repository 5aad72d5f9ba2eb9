"""Subset selection and particle-set editing: classes, thresholds, duplicates, half sets,
and recentring (the science behind `subtomo select` and `subtomo star`)."""

from subtomo.subsets.geometry_edits import recentred_origins
from subtomo.subsets.selection import duplicate_keep_mask, random_half_sets

__all__ = ["duplicate_keep_mask", "random_half_sets", "recentred_origins"]
