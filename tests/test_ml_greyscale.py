"""Grey-scale fit of references to the data (subtomo.ml.greyscale)."""

from __future__ import annotations

import dataclasses

import torch

from subtomo.ml.greyscale import fit_reference_scale
from test_ml_synthetic import make_batch, small_map

BOX = 24


def test_scale_is_recovered_from_noise_free_data_off_by_one_step(shared_data) -> None:
    """Noise-free data made from 3x the first reference and 0.5x the second give back 3 and
    0.5 from each class alone (and a value between them together) although the current
    offsets are one lattice step off (the offset search finds the true ones); a wrong shift
    sign, class lookup or CTF^2 weighting biases the scale."""
    vol, px = small_map("ribosome70S_4v4r_5A.mrc.gz", BOX)
    other, _ = small_map("ribosome50S_4v4r_5A.mrc.gz", BOX)
    refs = torch.stack([vol, other]).float()
    batch, truth = make_batch([3 * vol, 0.5 * other], px, 4, noise_std=0.0, fourier=True,
                              max_offset_angst=10.0)  # fmt: skip
    step = torch.tensor([[px, 0, 0], [0, -px, 0], [0, 0, px], [-px, 0, 0]]).double()
    batch = dataclasses.replace(batch, offsets=truth.offsets + step)
    sigma2 = torch.ones(1, BOX // 2 + 1, dtype=torch.float64)
    kw = dict(box=BOX, pixel_size=px, resolution_angst=3 * px, offset_step_angst=px)
    scale = fit_reference_scale(refs, [batch], sigma2, offset_range_angst=1.5 * px, **kw)
    # the same fit from each class alone gives the per-class factor
    alone = [
        fit_reference_scale(
            refs,
            [dataclasses.replace(batch, **_rows(batch, c))],
            sigma2,
            offset_range_angst=1.5 * px,
            **kw,
        )
        for c in (0, 1)
    ]
    assert abs(alone[0] - 3.0) < 1e-3 and abs(alone[1] - 0.5) < 1e-3, alone
    assert min(alone) < scale < max(alone)
    # without the offset search the shifted data fit worse (smaller scale)
    assert fit_reference_scale(refs, [batch], sigma2, **kw) < 0.9 * scale


def _rows(batch, cls: int) -> dict[str, torch.Tensor]:
    """The tensor fields of ``batch`` restricted to the particles of class ``cls``."""
    sel = batch.classes == cls
    return {
        f.name: getattr(batch, f.name)[sel]
        for f in dataclasses.fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
