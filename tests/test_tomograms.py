"""Tomograms (``subtomo reconstruct-tomograms``, :mod:`subtomo.tilt.tomogram`) against a known
volume: a chiral object projected by the simulator's independent Fourier projector
(:mod:`subtomo.simulate.projection`) through RELION's projection matrices (conventions §1.3)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from subtomo.ctf import ctf_2d
from subtomo.data import TomogramSet
from subtomo.errors import InputError
from subtomo.fourier import fsc, irfft_centered, lowpass_map
from subtomo.geometry import projection_matrices
from subtomo.io import read_mrc, read_mrc_header, read_star, write_mrc
from subtomo.jobs.reconstruct_tomograms import ReconstructTomogramsParams, run
from subtomo.simulate import VolumeProjector, project_rfft
from subtomo.tilt.tomogram import (
    CtfParams,
    back_project,
    fourier_bin,
    project,
    reconstruct_sirt,
    reconstruct_wbp,
    strip_depths,
    tomogram_grid,
)

N = 64  # volume edge (voxels) and tilt image edge (pixels)
TILTS = torch.arange(-60.0, 61.0, 6.0, dtype=torch.float64)  # 21 tilts


def chiral_object(n: int = N) -> torch.Tensor:
    """``(n, n, n)`` zyx: a right-handed helix of Gaussian blobs about y, with a blob off the
    axis at one end (its z-mirror is a left-handed helix)."""
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) - n // 2,) * 3, indexing="ij")
    volume = torch.zeros(n, n, n)
    for t in torch.linspace(-1.0, 1.0, 13):
        angle = 2 * math.pi * float(t)
        cx, cy, cz = 10 * math.cos(angle), 16 * float(t), 10 * math.sin(angle)
        volume += torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * 2.0**2))
    volume += torch.exp(-((x - 14) ** 2 + (y + 18) ** 2 + (z - 6) ** 2) / (2 * 2.5**2))
    return volume


def alignment(seed: int = 1) -> dict[str, torch.Tensor]:
    """True per-tilt columns: refined tilts, a tilt axis near 84°, shifts up to 3 px."""
    g = torch.Generator().manual_seed(seed)
    t = len(TILTS)
    return {
        "rlnTomoXTilt": torch.zeros(t, dtype=torch.float64),
        "rlnTomoYTilt": TILTS + 0.3,
        "rlnTomoZRot": 84.0 + 0.5 * torch.randn(t, generator=g, dtype=torch.float64),
        "rlnTomoXShiftAngst": 3 * torch.rand(t, generator=g, dtype=torch.float64) - 1.5,
        "rlnTomoYShiftAngst": 3 * torch.rand(t, generator=g, dtype=torch.float64) - 1.5,
    }


def project_volume(volume: torch.Tensor, columns: dict, px: float = 1.0) -> torch.Tensor:
    """``(t, N, N)`` projections with the simulator's projector: the rotation R_f, then the
    shift s_f/px, image centre N//2 (conventions §1.3)."""
    rot = projection_matrices(*(columns[c] for c in columns), px, (N,) * 3, (N, N))[:, :3, :3]
    projector = VolumeProjector.from_volume(volume)
    spectra = project_rfft(projector, rot)  # (t, 2N, N+1), centre at N
    s = projector.size
    ky = torch.fft.fftfreq(s)[:, None]
    kx = torch.fft.rfftfreq(s)[None, :]
    shift = torch.stack([columns["rlnTomoXShiftAngst"], columns["rlnTomoYShiftAngst"]], 1) / px
    phase = torch.exp(
        -2j
        * math.pi
        * (kx * shift[:, 0, None, None].float() + ky * shift[:, 1, None, None].float())
    )
    real = irfft_centered(spectra * phase, (s, s))  # centre at s//2
    start = s // 2 - N // 2
    return real[:, start : start + N, start : start + N].contiguous()


def correlation(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    a, b = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def sphere(n: int = N, radius: float = 28.0) -> torch.Tensor:
    z, y, x = torch.meshgrid(*(torch.arange(n) - n // 2,) * 3, indexing="ij")
    return x**2 + y**2 + z**2 <= radius**2


def matrices(columns: dict, px: float = 1.0, size=(N, N, N), image=(N, N)) -> torch.Tensor:
    return projection_matrices(*(columns[c] for c in columns), px, size, image)


def wedge_lowpass(volume: torch.Tensor, resolution_px: float = 8.0) -> torch.Tensor:
    """The filter both volumes get: the data's Fourier region (|kz| <= |kx| tan 60.3°, tilt
    axis y) and a low-pass to ``resolution_px`` pixels."""
    kz = torch.fft.fftfreq(N)[:, None, None]
    kx = torch.fft.rfftfreq(N)[None, None, :]
    wedge = (kz.abs() <= kx.abs() * math.tan(math.radians(60.3))).float()
    measured = torch.fft.irfftn(torch.fft.rfftn(volume) * wedge, s=volume.shape)
    return lowpass_map(measured, resolution_px, 1.0)


def near_z(volume: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    """Fourier correlation with the truth over |kz| > |kx|, below 0.125 cycles/voxel: the
    missing-wedge direction (the wedge and the high tilts around it)."""
    kz = torch.fft.fftfreq(N)[:, None, None]
    ky = torch.fft.fftfreq(N)[None, :, None]
    kx = torch.fft.rfftfreq(N)[None, None, :]
    r = (kx**2 + ky**2 + kz**2).sqrt()
    cone = (kz.abs() > kx.abs()) & (r < 0.125) & (r > 0)
    a, b = torch.fft.rfftn(volume * mask)[cone], torch.fft.rfftn(truth * mask)[cone]
    return float((a * b.conj()).real.sum() / (a.abs().norm() * b.abs().norm()))


@pytest.fixture(scope="module")
def series() -> tuple[torch.Tensor, dict, torch.Tensor]:
    truth = chiral_object()
    columns = alignment()
    return truth, columns, project_volume(truth, columns)


@pytest.fixture(scope="module")
def reconstructions(series) -> dict[str, torch.Tensor]:
    _, columns, images = series
    grid = tomogram_grid(matrices(columns), (N, N, N), (N, N), 1)
    return {
        "wbp": reconstruct_wbp(images, grid),
        "sirt": reconstruct_sirt(images, grid, iterations=10),
    }


def test_wbp_and_sirt_match_the_truth_not_its_mirror(series, reconstructions) -> None:
    truth = series[0]
    mask = sphere()
    floors = {"wbp": 0.99, "sirt": 0.9}
    for name, volume in reconstructions.items():
        direct = correlation(wedge_lowpass(volume), wedge_lowpass(truth), mask)
        mirror = correlation(wedge_lowpass(volume), wedge_lowpass(truth.flip(0)), mask)
        assert direct > floors[name] and mirror < direct - 0.3, (name, direct, mirror)
        # the plain low-pass also counts what the missing wedge hides (~1/3 of the power)
        plain = correlation(lowpass_map(volume, 8.0, 1.0), lowpass_map(truth, 8.0, 1.0), mask)
        assert plain > 0.85, (name, plain)


def test_sirt_beats_wbp_in_the_missing_wedge_direction(series, reconstructions) -> None:
    truth, mask = series[0], sphere()
    wbp = near_z(reconstructions["wbp"], truth, mask)
    sirt = near_z(reconstructions["sirt"], truth, mask)
    assert sirt > wbp + 0.03, (sirt, wbp)


def test_projection_is_the_back_projections_partner(series) -> None:
    """SIRT's ray sums and the back-projection describe one geometry: <B x, y> ≈ <x, Bᵀ y>."""
    _, columns, _ = series
    grid = tomogram_grid(matrices(columns), (N, N, N), (N, N), 1)
    g = torch.Generator().manual_seed(0)
    x = lowpass_map(torch.randn(N, N, N, generator=g), 6.0, 1.0) * sphere(radius=24)
    y = lowpass_map(torch.randn(len(TILTS), N, N, generator=g), 6.0, 1.0, ndim=2)
    depths = torch.zeros(1, dtype=torch.float64)
    bx = project(x, grid, depths)[:, 0]
    bty = back_project(y[:, None], grid, depths, slice(0, N), slice(0, len(TILTS)))
    assert abs(float((bx * y).sum()) / float((x * bty).sum()) - 1) < 0.02


def test_fourier_bin_keeps_sample_positions() -> None:
    y, x = torch.meshgrid(torch.arange(96.0), torch.arange(128.0), indexing="ij")
    image = torch.exp(-((x - 60.3) ** 2 + (y - 41.7) ** 2) / (2 * 6.0**2))
    binned = fourier_bin(image[None], 4)[0]
    assert binned.shape == (24, 32)
    assert torch.allclose(binned, image[::4, ::4], atol=2e-3)


@pytest.fixture(scope="module")
def layers(series) -> torch.Tensor:
    """``(t, N/2, N, N/2+1)``: per tilt, the Fourier transforms of the 2-voxel layers along the
    beam of the volume rotated by R_f (made without subtomo.tilt)."""
    truth, columns, _ = series
    rot = matrices(columns)[:, :3, :3].float()
    axis = torch.arange(N, dtype=torch.float32) - N // 2
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    points = torch.stack([x, y, z], -1)
    out = []
    for f in range(len(TILTS)):
        coords = (points @ rot[f] + N // 2) * (2.0 / (N - 1)) - 1  # R_f^T q per output q
        rotated = F.grid_sample(truth[None, None], coords[None], align_corners=True)[0, 0]
        out.append(
            torch.fft.rfft2(
                torch.fft.ifftshift(rotated.reshape(N // 2, 2, N, N).sum(1), dim=(-2, -1))
            )
        )
    return torch.stack(out)


def _ctf_series(
    layers: torch.Tensor, columns: dict, px: float, defocus: float, hand: int, slope: float
) -> torch.Tensor:
    """Images with a depth-dependent CTF: each layer times the CTF at its depth dz (defocus +
    hand·slope·px·dz, conventions §1.4), summed, then shifted by s_f."""
    depth = torch.arange(0, N, 2, dtype=torch.float64) + 0.5 - N // 2
    defoci = defocus + hand * slope * px * depth
    spectra = (layers * ctf_2d(defoci, defoci, 0.0, 300.0, 2.7, 0.07, px, N)).sum(1)
    s = torch.stack([columns["rlnTomoXShiftAngst"], columns["rlnTomoYShiftAngst"]], 1) / px
    ky, kx = torch.fft.fftfreq(N)[:, None], torch.fft.rfftfreq(N)[None, :]
    phase = -2j * math.pi * (kx * s[:, 0, None, None].float() + ky * s[:, 1, None, None].float())
    return irfft_centered(spectra * torch.exp(phase), (N, N))


def _mean_fsc(volume: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    curve = fsc(torch.fft.rfftn(volume * mask), torch.fft.rfftn(truth * mask), (N,) * 3)
    return float(curve[2 : N // 4].mean())


def test_phase_flipping_beats_no_correction_at_high_defocus(series, layers) -> None:
    truth, columns, _ = series
    px, defocus = 4.0, 60000.0  # 6 µm underfocus: the CTF changes sign ~10 times to Nyquist
    images = _ctf_series(layers, columns, px, defocus, hand=1, slope=1.0)
    grid = tomogram_grid(matrices(columns, px), (N, N, N), (N, N), 1)
    t = len(TILTS)
    ctf = CtfParams(
        torch.full((t,), defocus),
        torch.full((t,), defocus),
        torch.zeros(t),
        torch.zeros(t),
        300.0,
        2.7,
        0.07,
        1,
        1.0,
        px,
    )
    mask = sphere()
    plain = _mean_fsc(reconstruct_wbp(images, grid, pixel_size=px), truth, mask)
    flipped = _mean_fsc(reconstruct_wbp(images, grid, ctf=ctf, pixel_size=px), truth, mask)
    assert flipped > plain + 0.2, (flipped, plain)


def test_depth_strips_follow_the_hand(series, layers) -> None:
    """With the defocus slope exaggerated (x40: ±0.7 µm of defocus across the volume's depths)
    the strips must shift the defocus with rlnTomoHand's sign, as the simulation does."""
    truth, columns, _ = series
    px, defocus, slope = 4.0, 20000.0, 40.0
    images = _ctf_series(layers, columns, px, defocus, hand=-1, slope=slope)
    grid = tomogram_grid(matrices(columns, px), (N, N, N), (N, N), 1)
    t, mask = len(TILTS), sphere()
    scores = {}
    for hand in (-1, 1):
        ctf = CtfParams(
            torch.full((t,), defocus),
            torch.full((t,), defocus),
            torch.zeros(t),
            torch.zeros(t),
            300.0,
            2.7,
            0.07,
            hand,
            slope,
            px,
        )
        volume = reconstruct_wbp(images, grid, ctf=ctf, pixel_size=px, strip_angst=1000.0)
        scores[hand] = _mean_fsc(volume, truth, mask)
    assert scores[-1] > scores[1] + 0.03, scores  # measured 0.79 vs 0.74


def test_devices_agree(series, device) -> None:
    """One code path: WBP with phase flipping and dose weighting, and SIRT, on each device."""
    _, columns, images = series
    grid = tomogram_grid(matrices(columns, 4.0), (N, N, N), (N, N), 2)
    t = len(TILTS)
    ctf = CtfParams(
        torch.full((t,), 3e4),
        torch.full((t,), 3.1e4),
        torch.full((t,), 20.0),
        torch.zeros(t),
        300.0,
        2.7,
        0.07,
        -1,
        1.0,
        4.0,
    )
    binned = fourier_bin(images, 2)
    dose = torch.arange(t, dtype=torch.float64) * 3
    for method in (reconstruct_wbp, reconstruct_sirt):
        extra = {"iterations": 1} if method is reconstruct_sirt else {}
        kwargs = dict(ctf=ctf, pre_exposure=dose, pixel_size=4.0, strip_angst=200.0, **extra)
        here = method(binned, grid, **kwargs)
        there = method(binned.to(device), grid, **{**kwargs, "pre_exposure": dose.to(device)})
        assert there.device.type == device.type
        assert torch.allclose(there.cpu(), here, atol=1e-4 * float(here.abs().max()))


def test_tilt_groups_and_slabs_do_not_change_the_result(series, monkeypatch) -> None:
    """Memory bounds (strips of 3 tilts at a time, 1-slice slabs) give the same tomogram."""
    import subtomo.tilt.tomogram as tomogram

    _, columns, images = series
    grid = tomogram_grid(matrices(columns, 4.0), (N, N, N), (N, N), 2)
    t = len(TILTS)
    ctf = CtfParams(
        torch.full((t,), 3e4),
        torch.full((t,), 3e4),
        torch.zeros(t),
        torch.zeros(t),
        300.0,
        2.7,
        0.07,
        -1,
        1.0,
        4.0,
    )
    binned = fourier_bin(images, 2)
    whole = reconstruct_wbp(binned, grid, ctf=ctf, pixel_size=4.0, strip_angst=200.0)
    monkeypatch.setattr(tomogram, "STRIP_BYTES", 3 * 4 * 4 * 32 * 32)
    parts = reconstruct_wbp(
        binned, grid, ctf=ctf, pixel_size=4.0, strip_angst=200.0, slab_elements=32 * 32
    )
    assert torch.allclose(parts, whole, atol=1e-5 * float(whole.abs().max()))


def _write_series(images: torch.Tensor, columns: dict, folder, n_tilts: int | None = None) -> str:
    """tomograms.star + one MRC per tilt (and EVN/ODD halves) of the simulated series."""
    n = len(TILTS) if n_tilts is None else n_tilts
    names = {
        kind: [f"{folder}/TS_01_{k:02d}{kind}.mrc" for k in range(n)]
        for kind in ("", "_EVN", "_ODD")
    }
    for k in range(n):
        write_mrc(names[""][k], images[k], 2.0)
        write_mrc(names["_EVN"][k], 0.5 * images[k], 2.0)
        write_mrc(names["_ODD"][k], 0.5 * images[k], 2.0)
    tilts = pd.DataFrame(
        {
            "rlnMicrographName": names[""],
            "rlnMicrographNameEven": names["_EVN"],
            "rlnMicrographNameOdd": names["_ODD"],
            "rlnTomoNominalStageTiltAngle": TILTS[:n].numpy(),
            "rlnMicrographPreExposure": np.arange(n) * 3.0,
            **{c: v[:n].numpy() for c, v in columns.items()},
        }
    )
    table = pd.DataFrame(
        [
            {
                "rlnTomoName": "TS_01",
                "rlnVoltage": 300.0,
                "rlnSphericalAberration": 2.7,
                "rlnAmplitudeContrast": 0.07,
                "rlnTomoTiltSeriesPixelSize": 2.0,
                "rlnTomoHand": -1,
                "rlnTomoSizeX": N,
                "rlnTomoSizeY": N,
                "rlnTomoSizeZ": N,
            }
        ]
    )
    path = f"{folder}/tomograms.star"
    TomogramSet.from_tables(table, {"TS_01": tilts}).write(path, f"{folder}/tilt_series")
    return path


def test_reconstruct_tomograms_job(series, tmp_path) -> None:
    truth, columns, images = series
    columns = {
        **columns,
        "rlnTomoXShiftAngst": 2.0 * columns["rlnTomoXShiftAngst"],
        "rlnTomoYShiftAngst": 2.0 * columns["rlnTomoYShiftAngst"],
    }  # same pixels at 2 Å
    star = _write_series(images, columns, "in")
    outputs = run(ReconstructTomogramsParams(i=star, bin=2, ctf=False, dose_weighting=True))
    assert list(outputs) == ["Tomograms/job001/tomograms.star"]
    table = read_star("Tomograms/job001/tomograms.star")["global"].iloc[0]
    assert table["rlnTomoReconstructedTomogram"] == "Tomograms/job001/tomograms/rec_TS_01.mrc"
    assert table["rlnTomoReconstructedTomogramHalf2"].endswith("rec_TS_01_half2.mrc")
    assert float(table["rlnTomoTomogramBinning"]) == 2.0 and int(table["rlnTomoSizeZ"]) == N
    header = read_mrc_header(table["rlnTomoReconstructedTomogram"])
    assert tuple(header.shape) == (N // 2,) * 3 and header.voxel_size == pytest.approx(4.0)
    volume = read_mrc(table["rlnTomoReconstructedTomogram"])[0]
    half = read_mrc(table["rlnTomoReconstructedTomogramHalf1"])[0]
    assert torch.allclose(2 * half, volume, atol=1e-3 * float(volume.abs().max()))
    binned = lowpass_map(truth, 8.0, 1.0)[::2, ::2, ::2]
    mask = sphere(N // 2, 14.0)
    assert correlation(lowpass_map(volume, 4.0, 1.0), binned, mask) > 0.8


def test_reconstruct_tomograms_bad_input(series, tmp_path) -> None:
    _, columns, images = series
    with pytest.raises(InputError, match="1 tilt: a tomogram needs at least two"):
        run(ReconstructTomogramsParams(i=_write_series(images, columns, "one", 1), ctf=False))
    star = _write_series(images, columns, "all")
    with pytest.raises(InputError, match=r"needs \d+\.\d GiB, .* available"):
        run(ReconstructTomogramsParams(i=star, bin=1, w=100_000, h=100_000, ctf=False))
    with pytest.raises(InputError, match=r"no CTF \(rlnDefocusU\): run subtomo ctffind first"):
        run(ReconstructTomogramsParams(i=star))
    with pytest.raises(InputError, match="--wiener must be >= 0, and 0 with --method sirt"):
        run(ReconstructTomogramsParams(i=star, method="sirt", wiener=0.1))
    with pytest.raises(InputError, match="--ctf_3d and --wiener correct the CTF"):
        run(ReconstructTomogramsParams(i=star, ctf=False, ctf_3d=True))
    assert not Path("Tomograms").exists()


def test_ctf_3d_and_wiener_against_depth_strips(series, layers) -> None:
    """A thick specimen at 6 µm (defocus slope x20: 0.73 µm across the volume's depths),
    noise-free: phase flipping at every voxel depth (``ctf_3d``, NovaCTF's 3D correction) gives
    the strips' FSC to the truth (the π/2 rule already samples depth finely enough; measured
    0.768 both), far above no correction (0.24); Wiener weighting restores the amplitudes the
    flip leaves (0.807)."""
    truth, columns, _ = series
    px, defocus, slope = 4.0, 60000.0, 20.0
    images = _ctf_series(layers, columns, px, defocus, hand=1, slope=slope)
    grid = tomogram_grid(matrices(columns, px), (N, N, N), (N, N), 1)
    t, mask = len(TILTS), sphere()
    ctf = CtfParams(
        torch.full((t,), defocus), torch.full((t,), defocus), torch.zeros(t), torch.zeros(t),
        300.0, 2.7, 0.07, 1, slope, px,
    )  # fmt: skip
    lo, hi = grid.depth_range
    assert len(strip_depths(grid, ctf, 0.0, ctf_3d=True)) == math.ceil(hi - lo) + 1
    score = {
        name: _mean_fsc(reconstruct_wbp(images, grid, pixel_size=px, **kwargs), truth, mask)
        for name, kwargs in {
            "none": {},
            "strips": {"ctf": ctf},
            "3d": {"ctf": ctf, "ctf_3d": True},
            "wiener": {"ctf": replace(ctf, wiener=0.01)},
        }.items()
    }
    assert abs(score["3d"] - score["strips"]) < 0.01, score
    assert score["3d"] > score["none"] + 0.4, score
    assert score["wiener"] > score["strips"] + 0.02, score
