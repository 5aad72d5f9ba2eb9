"""The unregularised half maps of auto-refine and their gold-standard FSC, against the truth.

Two half sets of CTF-modulated, noisy projections of a known map are inserted as the M-step
does (data ``CTF * Y``, weight ``CTF^2``) up to a limited radius, as in an iteration whose
current image size is below the box.
"""

from __future__ import annotations

import torch

from subtomo.fourier import extract_slices, fsc_maps, projector_rfft, radius_grid
from subtomo.ml.autorefine import halfset_fsc
from subtomo.reconstruct import FourierAccumulator, reconstruct
from test_slices import blob_map, random_matrices

BOX = 32
SHELLS = torch.arange(2, 10)  # inside the inserted radius 12, away from its edge


def _half(truth: torch.Tensor, seed: int, max_radius: float) -> FourierAccumulator:
    """300 projections with a random-defocus CTF and white noise, inserted to ``max_radius``."""
    g = torch.Generator().manual_seed(seed)
    mats = random_matrices(300, seed=seed)
    slices = extract_slices(projector_rfft(truth, 2.0), mats, padding=2.0)
    k2 = radius_grid((BOX, BOX)).double() ** 2 / BOX**2  # (cycles/px)^2
    defocus = 150 + 100 * torch.rand(mats.shape[0], 1, 1, generator=g, dtype=torch.float64)
    ctf = -torch.sin(torch.pi * defocus * k2 + 0.1).float()
    shape = slices.shape
    noise = torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    acc = FourierAccumulator(BOX, 2.0)
    acc.insert(ctf * (ctf * slices + 30 * noise), ctf**2, mats, max_radius=max_radius)
    return acc


def test_gold_standard_fsc_tells_the_half_maps_quality() -> None:
    """Independent noise in the halves: FSC(half1, half2) = FSC(half, truth)^2 shell by shell
    (within 0.06) where the FSC is informative, zero beyond the inserted radius, and the
    shells inside do not depend on that radius (within 0.03)."""
    truth = blob_map(BOX, seed=5, sigma=0.8).double()
    halves = [_half(truth.float(), seed, 12) for seed in (1, 2)]
    maps = [reconstruct(h, taper=0, max_radius=12).double() for h in halves]
    gold = halfset_fsc(*maps, current_size=24)
    to_truth = fsc_maps(maps[0], truth).double()
    assert float(gold[SHELLS].min()) < 0.7 < float(gold[SHELLS].max()), gold  # informative
    assert torch.allclose(gold[SHELLS], to_truth[SHELLS] ** 2, atol=0.06), (gold, to_truth**2)
    assert float(gold[12:].abs().max()) == 0.0

    wider = [reconstruct(_half(truth.float(), s, 15), taper=0, max_radius=15) for s in (1, 2)]
    assert torch.allclose(halfset_fsc(*wider)[SHELLS], gold[SHELLS], atol=0.03)


def test_the_edge_of_the_inserted_radius_does_not_drown_the_half_maps() -> None:
    """A few voxels just inside the inserted edge that got only a sliver of weight (1e-5 of
    the typical) with ordinary data, as where a splat's corner meets a CTF zero: their
    quotients are huge. Reconstructed with ``max_radius`` the half maps keep their quality
    (within 0.02 of the clean ones); without it they lose the low-resolution shells."""
    truth = blob_map(BOX, seed=5, sigma=0.8).double()
    acc = _half(truth.float(), 1, 12)
    clean = fsc_maps(reconstruct(acc, taper=0, max_radius=12).double(), truth).double()
    n = acc.padded
    r = radius_grid((n, n, n))
    edge = ((r > 23.2) & (r < 24)).nonzero()[::40]  # box shell 12, the last inserted
    z, y, x = edge.unbind(1)
    typical = float(acc.weight[acc.weight > 0].median())
    acc.weight[z, y, x] = 1e-5 * typical
    acc.data[z, y, x] = 0.1 * acc.data[acc.weight > typical].abs().median().to(acc.data.dtype)
    cut = fsc_maps(reconstruct(acc, taper=0, max_radius=12).double(), truth).double()
    uncut = fsc_maps(reconstruct(acc, taper=0).double(), truth).double()
    assert float((clean[SHELLS] - cut[SHELLS]).abs().max()) < 0.02
    assert float(uncut[SHELLS].mean()) < float(cut[SHELLS].mean()) - 0.1, (uncut, cut)
