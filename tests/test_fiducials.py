"""Fiducial tilt-series alignment (``subtomo align-tilts --fiducial``, conventions §20) against
the simulator's truth: the bead projection model is RELION's (§1.3), the least-squares fit
recovers a known geometry from noisy bead positions, and the job aligns a noisy series with
gold beads (shift, tilt-axis, tilt-angle, tilt-offset and in-plane errors) to the bar, writes
the same columns as the fiducial-less mode and lists the beads; a series without beads is a
one-line error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from subtomo.data import TomogramSet
from subtomo.errors import InputError
from subtomo.geometry import project_particles
from subtomo.io import read_star
from subtomo.jobs.align_tilts import AlignTiltsParams
from subtomo.jobs.align_tilts import run as align_tilts
from subtomo.jobs.simulate import SimulateParams
from subtomo.jobs.simulate import run as simulate_job
from subtomo.simulate.truth import alignment_error
from subtomo.tilt.alignment import TiltAlignment
from subtomo.tilt.fiducials import (
    _match,
    _median_offset,
    _project,
    detect_beads,
    fit_projection_model,
)

SIZE = (128, 128, 48)


def _truth(seed: int = 0) -> tuple[TiltAlignment, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(-60.0, 61.0, 6.0, dtype=torch.float64)
    t = len(y)
    true = TiltAlignment(
        y + 0.3 * torch.randn(t, generator=g, dtype=torch.float64),
        torch.full((t,), 87.0, dtype=torch.float64) + 0.2 * torch.randn(t, generator=g),
        4 * torch.randn(t, 2, generator=g, dtype=torch.float64),
    )
    beads = (torch.rand(10, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor(
        [100.0, 100.0, 40.0]
    )
    return true, beads


def test_detection_keeps_beads_not_particles() -> None:
    """4 dark beads (radius 3 px) and 6 fainter dark blobs, particle-like, in a clean 96²
    image: the blobs alone pass the threshold, but next to the beads they fall below the
    beads' scores by more than BEAD_GAP and are dropped; the beads are found to 0.2 px."""
    y, x = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
    beads = torch.tensor([[20.3, 25.0], [70.0, 18.6], [48.5, 50.2], [30.0, 75.4]])
    blobs = torch.tensor([[60.0, 70.0], [80.0, 45.0], [15.0, 50.0], [45.0, 20.0],
                          [75.0, 80.0], [50.0, 85.0]])  # fmt: skip

    def dark(centres: torch.Tensor, scale: float, shape) -> torch.Tensor:
        return -scale * sum(shape((x - cx) ** 2 + (y - cy) ** 2) for cx, cy in centres.tolist())

    def disc(r2: torch.Tensor) -> torch.Tensor:
        return 2 * (9.0 - r2).clamp_min(0).sqrt()

    def blob(r2: torch.Tensor) -> torch.Tensor:
        return torch.exp(-r2 / (2 * 3.0**2))

    noise = 0.01 * torch.randn(96, 96, generator=torch.Generator().manual_seed(0))
    particles = dark(blobs, 0.5, blob) + noise
    assert len(detect_beads(particles[None], 3.0)[0]) >= 6  # they pass the threshold alone
    (found,) = detect_beads((particles + dark(beads, 1.0, disc))[None], 3.0)
    assert len(found) == 4, found
    distance = torch.cdist(found[:, :2].float(), beads).amin(1)
    assert float(distance.max()) < 0.2, distance


def test_a_tilt_left_off_is_matched_after_its_median_offset() -> None:
    """A tilt whose model is 4 px off (more than a radius of 3 px): matching the predicted
    beads within a radius finds none, after the tilt's median offset every bead finds its own
    detection (25 beads at SNR 1: one tilt kept 3 of 19 beads and its tilt angle drifted by
    3°, 0.441 px RMS; with the offset 0.046 px)."""
    g = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(3.0), indexing="ij"), -1)
    found = (grid.reshape(12, 2) * 20 + 10).double()
    predicted = found - torch.tensor([4.0, -1.0], dtype=torch.float64)
    predicted = predicted + 0.3 * torch.randn(12, 2, generator=g, dtype=torch.float64)
    assert (_match(predicted, found, 3.0) < 0).all()
    offset = _median_offset(predicted, found, 6.0)
    assert torch.equal(_match(predicted + offset, found, 3.0), torch.arange(12))


def test_bead_model_is_relions_projection() -> None:
    """Bead positions of the fit's model equal RELION's projection matrices' (a wrong sign of
    a rotation or of the centre would move them by pixels)."""
    true, beads = _truth()
    centre = torch.tensor([SIZE[0] // 2, SIZE[1] // 2], dtype=torch.float64)
    decentred = beads + torch.tensor([s / 2 for s in SIZE], dtype=torch.float64)
    uv, _ = project_particles(true.matrices(1.0, SIZE, SIZE[:2]), decentred, SIZE)
    model = _project(true.y_tilt, true.z_rot, true.shifts, beads, centre)
    assert torch.allclose(uv.transpose(0, 1), model, atol=1e-9)


def test_fit_recovers_known_geometry() -> None:
    """From the nominal angles, a 2° axis error, shifts off by 1.5 px and the beads at depth 0,
    the fit of exact bead positions lands within 0.02 px RMS (gauge-free) and 0.02° of the
    axis (the weak prior's bias); with 0.2 px noise and a bead missing in a tilt within 0.25
    px and 0.1°."""
    true, beads = _truth()
    centre = torch.tensor([SIZE[0] // 2, SIZE[1] // 2], dtype=torch.float64)
    exact = _project(true.y_tilt, true.z_rot, true.shifts, beads, centre)
    g = torch.Generator().manual_seed(1)
    noisy = exact + 0.2 * torch.randn(exact.shape, generator=g, dtype=torch.float64)
    noisy[4, 2] = torch.nan
    nominal = torch.arange(-60.0, 61.0, 6.0, dtype=torch.float64)
    start = TiltAlignment(nominal, torch.full_like(nominal, 85.0), true.shifts + 1.5)
    ref = int(nominal.abs().argmin())
    for observed, px, deg in ((exact, 0.02, 0.02), (noisy, 0.25, 0.1)):
        fitted, _ = fit_projection_model(
            observed, start, beads * torch.tensor([1.0, 1.0, 0.0]), SIZE[:2], ref, 50
        )
        rms, _ = alignment_error(
            true.matrices(1.0, SIZE, SIZE[:2]), fitted.matrices(1.0, SIZE, SIZE[:2]), SIZE
        )
        assert float(rms.square().mean().sqrt()) < px
        assert abs(float((fitted.z_rot - true.z_rot).mean())) < deg


def _matrices(star: Path, name: str = "TS_01") -> torch.Tensor:
    series = TomogramSet.read(star)[name]
    order = np.argsort(series.tilts["rlnTomoNominalStageTiltAngle"].to_numpy(), kind="stable")
    return series.projection_matrices(SIZE[:2])[torch.from_numpy(order)]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    """21 tilts (±60°) of 128² at 20 Å/px, 6 particles at SNR 0.1 and 8 beads of radius 3 px
    (120 Å); shifts σ 4 px, tilt axis +2°, tilt offset +1°, tilt angles σ 0.3°, in-plane σ
    0.2°."""
    root = tmp_path_factory.mktemp("fiducial")
    simulate_job(
        SimulateParams(
            output_dir=str(root / "sim"), tomogram_size=SIZE, pixel_size=20.0, box=24,
            particles=6, tilt_step=6.0, noise="gaussian", snr=0.1, tilt_shift_error_px=4.0,
            axis_error_deg=2.0, tilt_offset_deg=1.0, tilt_angle_error_deg=0.3,
            in_plane_error_deg=0.2, beads=8, bead_radius_px=3.0, seed=2,
        )
    )  # fmt: skip
    return root


def test_job_aligns_on_beads_to_the_bar(simulated: Path) -> None:
    """Gauge-free residual <= 0.5 px RMS, axis within 0.3°, the tilt offset recovered (mean
    tilt angle within 0.3° of the truth's, 1° off at the start), every bead found and the
    fitted beads in the truth's places after the gauge motion (< 1 px)."""
    out = simulated / "AlignTiltSeries/job001"
    align_tilts(
        AlignTiltsParams(
            i=str(simulated / "sim/tomograms.star"), output_dir=str(out),
            project_dir=str(simulated), fiducial=True, bead_diameter=120.0,
        )
    )  # fmt: skip
    star = out / "aligned_tilt_series.star"
    true = _matrices(simulated / "sim/true_alignment.star")
    rms, motion = alignment_error(true, _matrices(star), SIZE)
    assert float(rms.square().mean().sqrt()) <= 0.5, rms
    found = TomogramSet.read(star)["TS_01"].tilts
    truth = TomogramSet.read(simulated / "sim/true_alignment.star")["TS_01"].tilts
    assert abs(found["rlnTomoZRot"].mean() - truth["rlnTomoZRot"].mean()) <= 0.3
    assert abs(found["rlnTomoYTilt"].mean() - truth["rlnTomoYTilt"].mean()) <= 0.3
    assert {"subtomoAlignResidual", "subtomoAlignFlagged", "rlnTomoXShiftAngst"} <= set(found)
    assert found["subtomoAlignFlagged"].sum() == 0
    beads = read_star(out / "fiducials.star")["fiducials"]
    true_beads = read_star(simulated / "sim/fiducials.star")["fiducials"]
    assert len(beads) == len(true_beads)
    cols = [f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]
    centre = torch.tensor([s / 2 for s in SIZE], dtype=torch.float64)
    fitted = torch.tensor(beads[cols].to_numpy()) / 20.0 + centre
    expected = torch.tensor(true_beads[cols].to_numpy()) / 20.0 + centre
    moved = expected @ motion[:3, :3].T + motion[:3, 3]  # the truth in the found frame
    distance = torch.cdist(fitted, moved).amin(1)
    assert float(distance.max()) < 1.0, distance


def test_no_beads_is_a_one_line_error(simulated: Path, tmp_path: Path) -> None:
    """Beads of 5 Å at 20 Å/px cannot be seen: refused before the job starts."""
    with pytest.raises(InputError, match="bead_diameter"):
        align_tilts(
            AlignTiltsParams(
                i=str(simulated / "sim/tomograms.star"), output_dir=str(tmp_path / "a"),
                fiducial=True, bead_diameter=5.0,
            )
        )  # fmt: skip
    assert not (tmp_path / "a").exists()
