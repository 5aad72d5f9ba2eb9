"""Gold erasing for fiducial-less alignment: find the beads and fill them with noise of the
local statistics, as IMOD's ccderaser does with a fiducial model (conventions §18, "Gold erasing").

Why: projection matching compares each tilt with the projection of a back-projection of the
others; for a tilt at the end of the tilt range the others all lie on one side, and the
streaks of a dense bead near the specimen's surface, cut off by the volume's top or bottom,
project off-centre, moving the bead by 1-1.5 binned px across the tilt axis (the direction
and size depend on its depth). Beads, far denser than protein, dominate the patch
correlations, so their biased displacements drive the tilt angles and in-plane rotations
away from the truth by up to 1° per round (measured from the true alignment of the benchmark
series with 12 beads: 1.0 px RMS after three rounds). Erased, the specimen aligns as one
without beads.

Beads are found by :func:`subtomo.tilt.fiducials.detect_beads` (matched filter); a detection
counts as gold when it scores at least a quarter of the median over tilts of each tilt's
strongest one (measured on the benchmark series at bin 2: beads score 190-220 robust σ at
SNR 1 and 80-90 at SNR 0.1, protein 6-12), and every pixel within 1.6 radii of one is
replaced by :func:`subtomo.tilt.xrays.erase_defects` (the median of the unflagged pixels of a
window twice the erased diameter, plus noise of the image's high-frequency σ). On a series
without gold the strongest dark spots of protein are erased instead (a loss of signal, no
bias): erasing is an option (``--erase_gold``), not automatic.
"""

from __future__ import annotations

import math

import torch

from subtomo.tilt.fiducials import detect_beads
from subtomo.tilt.xrays import erase_defects

__all__ = ["erase_beads"]

ERASE_RADII = 1.6  # erased disc radius in bead radii (the bead's edge blurred by binning)
CONTRAST = 0.25  # a bead scores at least this fraction of the median tilt's strongest one


def erase_beads(
    images: torch.Tensor,
    radius_px: float,
    binning: int = 1,
    threshold: float = 6.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(erased images, beads found per tilt (t,))``: ``images`` ``(t, h, w)`` at ``binning``
    (their pixel is ``binning`` bin-1 px), beads of ``radius_px`` bin-1 px found with
    ``threshold`` robust σ of the matched filter and filled with seeded noise."""
    t, h, w = images.shape
    found = detect_beads(images.float(), radius_px / binning, threshold)
    strongest = torch.tensor([float(d[:, 2].max()) if len(d) else 0.0 for d in found])
    floor = max(threshold, CONTRAST * float(strongest.median()))
    found = [d[d[:, 2] >= floor] for d in found]
    radius = ERASE_RADII * radius_px / binning  # px of ``images``
    size = 2 * math.ceil(2 * radius) + 1  # the window: twice the erased diameter, odd
    y, x = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    generator = torch.Generator().manual_seed(seed)
    out = images.float().clone()
    for f in range(t):
        mask = torch.zeros(h, w, dtype=torch.bool)
        for cx, cy in found[f][:, :2].tolist():
            mask |= (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
        out[f] = erase_defects(images[f], mask, generator, size)
    return out, torch.tensor([len(beads) for beads in found])
