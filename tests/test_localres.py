"""Local resolution on simulated half maps whose two halves of the box carry different,
known resolutions (FSC = 0.143 at 9 Å on the left, 6 Å on the right)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from subtomo.fourier import bfactor_weights, irfft_centered, rfft_centered
from subtomo.io import read_mrc, write_mrc
from subtomo.jobs.localres import LocalResParams, run
from subtomo.postprocess import LocalResOptions, local_resolution

N, PX, SN0, NOISE = 64, 2.0, 16.0, 0.25
RES_LEFT, RES_RIGHT = 9.0, 6.0


def _blur_for(res: float) -> float:
    """B such that SN0 * exp(-B k^2 / 2) = 1/6 (FSC = 1/7 ~ 0.143) at k = 1/res."""
    return 2 * math.log(6 * SN0) * res**2


@pytest.fixture(scope="module")
def two_region_halves():
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(N, N, N, generator=g)
    ft = rfft_centered(truth, 3)
    left = torch.sigmoid((N / 2 - torch.arange(N).float()) / 2.0)[None, None, :]
    sig = {r: irfft_centered(ft * bfactor_weights((N,) * 3, _blur_for(r), PX), (N,) * 3)
           for r in (RES_LEFT, RES_RIGHT)}  # fmt: skip
    s = sig[RES_LEFT] * left + sig[RES_RIGHT] * (1 - left)
    h1 = s + NOISE * torch.randn(s.shape, generator=g)
    h2 = s + NOISE * torch.randn(s.shape, generator=g)
    return h1, h2


def _shells(res: torch.Tensor) -> torch.Tensor:
    return N * PX / res


def test_two_regions_recovered_within_1p5_shells(two_region_halves, device):
    """The median local resolution of the windows inside each region is within 1.5 Fourier
    shells (of the 64-box) of the resolution built into that region, and the map shows the
    two levels; swapped or averaged regions would miss by ~7 shells."""
    h1, h2 = (h.to(device) for h in two_region_halves)
    r = local_resolution(h1, h2, PX, options=LocalResOptions(sampling=16, randomize_at=30))
    x = r.points[:, 2]
    for sel, true in [(x <= 18, RES_LEFT), (x >= 46, RES_RIGHT)]:
        est = r.point_resolution[sel].median()
        assert abs(_shells(est) - N * PX / true) <= 1.5, (float(est), true)
    left_map = r.resolution_map[16:48, 16:48, 10:18].median()
    right_map = r.resolution_map[16:48, 16:48, 46:54].median()
    assert abs(_shells(left_map) - N * PX / RES_LEFT) <= 1.5
    assert abs(_shells(right_map) - N * PX / RES_RIGHT) <= 1.5
    # The filtered map keeps more high-frequency power on the better side.
    assert r.filtered.abs().sum() > 0


def test_localres_job_writes_maps_and_histogram(two_region_halves, tmp_path):
    """The job writes the local-resolution map (Å, within the possible range), the filtered
    map, the point table and the histogram, restricted to windows reaching the mask."""
    h1, h2 = two_region_halves
    write_mrc(tmp_path / "h_half1.mrc", h1, PX)
    write_mrc(tmp_path / "h_half2.mrc", h2, PX)
    mask = torch.zeros(N, N, N)
    mask[16:48, 16:48, 8:56] = 1.0
    write_mrc(tmp_path / "mask.mrc", mask, PX)
    out = tmp_path / "LocalRes" / "job003"
    res = run(
        LocalResParams(
            i=str(tmp_path / "h_half1.mrc"), mask=str(tmp_path / "mask.mrc"),
            locres_sampling=16, locres_randomize_at=30, output_dir=str(out),
            project_dir=str(tmp_path), device="cpu",
        )
    )  # fmt: skip
    for name in ["relion_locres.mrc", "relion_locres_filtered.mrc", "relion_locres.star",
                 "histogram.png", "RELION_JOB_EXIT_SUCCESS"]:  # fmt: skip
        assert (out / name).is_file(), name
    locres, px = read_mrc(out / "relion_locres.mrc")
    assert px == pytest.approx(PX)
    inside = locres[mask > 0.5].numpy()
    assert np.all(inside >= 2 * PX) and np.all(inside <= 50.0)
    # Only windows reaching into the mask were sampled (window reach 4 + 8 = 12 px).
    lo = torch.tensor([16, 16, 8])
    hi = torch.tensor([47, 47, 55])
    gap = (lo - res.points).clamp(min=0) + (res.points - hi).clamp(min=0)
    assert (gap.float().norm(dim=-1) < 12).all()
    assert res.points.shape[0] > 50
