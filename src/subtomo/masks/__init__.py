"""Masks: RELION-style solvent masks from maps, de novo shapes, distance transforms."""

from subtomo.masks.create import (
    Combine,
    automatic_mask,
    binary_threshold,
    extend_binary,
    mask_from_map,
    soft_edge,
    suggest_threshold,
)
from subtomo.masks.distance import squared_distance_to
from subtomo.masks.shapes import crown_mask, cylinder_mask, radius_from, soft_sphere

__all__ = [
    "Combine",
    "automatic_mask",
    "binary_threshold",
    "crown_mask",
    "cylinder_mask",
    "extend_binary",
    "mask_from_map",
    "radius_from",
    "soft_edge",
    "soft_sphere",
    "squared_distance_to",
    "suggest_threshold",
]
