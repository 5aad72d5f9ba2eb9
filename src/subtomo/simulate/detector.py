"""What the detector records besides particles: a CTF-modulated sample background (Thon rings),
Poisson counts, hot pixels, X-ray hits and dark tilts, with their truth.

**Sample background.** The specimen is a slab ``T`` thick (amorphous ice and sample) whose
mid-plane is the tilt-series specimen plane. Its image is a Gaussian field whose power
spectrum is what a stack of independent thin layers through the slab gives: the mean over
``layers`` depths of RELION's ``CTF²`` (:func:`subtomo.ctf.ctf_2d`), each layer at the central
defocus plus its height times :func:`subtomo.tilt.slab_depth_factor` (``1/cos θ``), times an
envelope ``exp(-B |k|²/2)`` (``B`` on the amplitude, as rlnCtfBfactor). The layers sit at
the midpoints of ``layers`` equal slices of the slab, whose mean of ``cos(2π λ z |k|²)`` has
the zeros of the continuous slab's sinc (up to ``λ T |k|² = layers``): the thickness nodes
of Thon rings (Elferich et al. 2024). The CTF estimator models them with a sinc, so the two
are independent. Across a tilted image the defocus
changes as ``hand · px · g · (u, v)`` (:func:`subtomo.tilt.depth_gradient`, §1.4): the field is
rendered at defocus nodes ``node_step`` Å apart from one white noise and blended linearly
per pixel, so the rings move across the image with the right hand.

**Counts.** ``image = Poisson(dose_px · (1 + b))`` with ``b`` the background scaled so that
its low-frequency power is ``contrast`` times the counting noise.

**Defects** (added after counting, as the detector adds them): hot pixels (fixed detector
positions, the same in every tilt) and X-ray hits (a 1-pixel-wide streak of 1 to
``xray_max_length`` pixels per hit, random per tilt), each ``defect_sigma`` = 10 to 50 times
the counting noise above the local mean. **Dark tilts** receive ``dark_fraction`` of the dose.

Image arrays are ``(t, h, w)`` (y, x), tilts in the per-tilt table's row order.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from subtomo.ctf import ctf_2d
from subtomo.data import TomogramSet
from subtomo.io import write_mrc, write_star
from subtomo.simulate.acquisition import tilt_defocus, tilt_scheme
from subtomo.tilt import depth_gradient, slab_depth_factor, table_rotations

__all__ = [
    "DetectorParams",
    "DetectorSeries",
    "add_defects",
    "apply_detector",
    "detector_series",
    "sample_background",
    "truth_tables",
    "write_detector_series",
]


@dataclass(frozen=True)
class DetectorParams:
    """Sample and detector. ``thickness_nm`` slab thickness; ``contrast`` Thon-ring power over
    counting noise at low frequency; ``bfactor`` envelope (Å²); ``dose_per_px`` electrons per
    pixel per tilt; ``hot_pixels`` per image (fixed positions); ``xrays`` hits per image;
    ``dark_tilts`` 0-based rows receiving ``dark_fraction`` of the dose; ``hand`` rlnTomoHand
    of the simulated gradient (±1)."""

    thickness_nm: float = 150.0
    contrast: float = 1.0
    bfactor: float = 40.0
    dose_per_px: float = 12.0
    layers: int = 9
    node_step_angst: float = 200.0
    hot_pixels: int = 0
    xrays: int = 0
    xray_max_length: int = 20
    defect_sigma: tuple[float, float] = (10.0, 50.0)
    dark_tilts: tuple[int, ...] = ()
    dark_fraction: float = 0.02
    hand: int = -1


def sample_background(
    image_size: tuple[int, int],
    pixel_size: float,
    optics: tuple[float, float, float],
    tilts: pd.DataFrame,
    params: DetectorParams,
    generator: torch.Generator,
) -> torch.Tensor:
    """The slab's contrast ``b`` float32 ``(t, h, w)`` (zero mean): see the module docstring.

    ``optics`` = (voltage kV, Cs mm, Q0); ``tilts`` gives rlnDefocusU/V/Angle (the central
    CTF) and the geometry (:func:`subtomo.tilt.table_rotations`); ``image_size`` = (w, h).
    """
    w, h = image_size
    rotations = table_rotations(tilts)
    gradient = depth_gradient(rotations) * params.hand * pixel_size  # (t, 2) Å per px
    spread = params.thickness_nm * 10.0 * slab_depth_factor(rotations)  # (t,) Å
    heights = (torch.arange(params.layers, dtype=torch.float64) + 0.5) / params.layers - 0.5
    y, x = torch.meshgrid(
        torch.arange(h, dtype=torch.float64) - h // 2,
        torch.arange(w, dtype=torch.float64) - w // 2,
        indexing="ij",
    )
    kx = torch.fft.rfftfreq(w, pixel_size, dtype=torch.float64)
    ky = torch.fft.fftfreq(h, pixel_size, dtype=torch.float64)
    k2 = ky[:, None] ** 2 + kx[None, :] ** 2
    envelope = torch.exp(-0.5 * params.bfactor * k2)  # power: amplitude exp(-B k²/4) squared
    scale = math.sqrt(params.contrast / params.dose_per_px)
    voltage, cs, q0 = optics
    out = torch.empty(len(tilts), h, w)
    for f in range(len(tilts)):
        row = tilts.iloc[f]
        offset = gradient[f, 0] * x + gradient[f, 1] * y  # (h, w) Å of extra defocus
        lo, hi = float(offset.min()), float(offset.max())
        n_nodes = max(2, math.ceil((hi - lo) / params.node_step_angst) + 1)
        nodes = torch.linspace(lo, hi + 1e-6, n_nodes, dtype=torch.float64)
        power = torch.empty(n_nodes, h, w // 2 + 1, dtype=torch.float64)
        for m, node in enumerate(nodes):
            shift = node + heights * spread[f]  # (layers,) Å
            ctf = ctf_2d(
                float(row["rlnDefocusU"]) + shift,
                float(row["rlnDefocusV"]) + shift,
                float(row["rlnDefocusAngle"]),
                voltage, cs, q0, pixel_size, (h, w),
            )  # fmt: skip
            power[m] = (ctf.double() ** 2).mean(0)
        amplitude = torch.sqrt(power * envelope) * scale  # (nodes, h, w')
        noise = torch.fft.rfft2(torch.randn(h, w, generator=generator, dtype=torch.float64),
                                norm="ortho")  # fmt: skip
        fields = torch.fft.irfft2(amplitude * noise, s=(h, w), norm="ortho")  # (nodes, h, w)
        position = (offset - lo) / (nodes[1] - nodes[0])
        below = position.floor().clamp(0, n_nodes - 2).long()
        frac = position - below
        low = fields.gather(0, below[None]).squeeze(0)
        high = fields.gather(0, (below + 1)[None]).squeeze(0)
        out[f] = ((1 - frac) * low + frac * high).float()
    return out


def _streak(
    rng: np.random.Generator, shape: tuple[int, int], max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (y, x) of one X-ray streak: 1 to ``max_length`` pixels along a random line."""
    h, w = shape
    length = int(rng.integers(1, max_length + 1))
    angle = rng.uniform(0, np.pi)
    y0, x0 = rng.uniform(2, h - 2 - max_length), rng.uniform(2, w - 2 - max_length)
    steps = np.arange(length)
    ys = np.round(y0 + steps * np.sin(angle)).astype(int)
    xs = np.round(x0 + steps * np.cos(angle)).astype(int)
    keep = np.unique(ys * w + xs)
    return keep // w, keep % w


def add_defects(
    images: torch.Tensor, params: DetectorParams, rng: np.random.Generator, sigma: float
) -> tuple[torch.Tensor, torch.Tensor, pd.DataFrame]:
    """Hot pixels and X-ray hits added to ``images`` ``(t, h, w)`` whose noise is ``sigma``.

    Returns the images, the defect mask ``(t, h, w)`` bool and one row per defect (tilt row
    0-based, then subtomoDefectKind, subtomoX/Y of its first pixel, subtomoPixels and
    subtomoPeakSigma, its amplitude in noise σ).
    """
    t, h, w = images.shape
    images = images.clone()
    mask = torch.zeros(t, h, w, dtype=torch.bool)
    hot = rng.choice(h * w, size=params.hot_pixels, replace=False)
    hot_amp = rng.uniform(*params.defect_sigma, size=params.hot_pixels)
    rows = []
    for f in range(t):
        defects = [("hot_pixel", np.array([p // w]), np.array([p % w]), a)
                   for p, a in zip(hot, hot_amp, strict=True)]  # fmt: skip
        for _ in range(params.xrays):
            ys, xs = _streak(rng, (h, w), params.xray_max_length)
            defects.append(("xray", ys, xs, rng.uniform(*params.defect_sigma)))
        for kind, ys, xs, amp in defects:
            yt, xt = torch.as_tensor(ys), torch.as_tensor(xs)
            images[f, yt, xt] += float(amp * sigma)
            mask[f, yt, xt] = True
            rows.append((f, kind, int(xs[0]), int(ys[0]), len(ys), float(amp)))
    columns = ["tilt", "subtomoDefectKind", "subtomoX", "subtomoY", "subtomoPixels",
               "subtomoPeakSigma"]  # fmt: skip
    table = pd.DataFrame(rows, columns=columns).astype(
        {"tilt": int, "subtomoX": int, "subtomoY": int, "subtomoPixels": int}
    )
    return images, mask, table


def apply_detector(
    images: torch.Tensor,
    tilts: pd.DataFrame,
    optics: tuple[float, float, float],
    pixel_size: float,
    params: DetectorParams,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor, pd.DataFrame]:
    """Add the sample background, defects and dark tilts to rendered tilt images
    ``(t, h, w)`` whose noise σ is their standard deviation (``subtomo simulate``): the
    background at ``contrast`` times that noise's power, defects in units of it, dark rows
    scaled by ``dark_fraction``. Returns images, defect mask and defects
    (:func:`add_defects`)."""
    sigma = float(images.std())
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    w, h = images.shape[-1], images.shape[-2]
    background = sample_background((w, h), pixel_size, optics, tilts, params, generator)
    images = images.cpu() + sigma * math.sqrt(params.dose_per_px) * background
    images[list(params.dark_tilts)] *= params.dark_fraction
    return add_defects(images, params, rng, sigma)


def truth_tables(
    name: str, files: list[str], tilts: pd.DataFrame, params: DetectorParams,
    defects: pd.DataFrame,
) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """``(per-tilt truth, defects)`` of one series for ``detector_truth.star`` and
    ``defects.star``: per tilt the true central CTF, hand, slab thickness, dark flag and defect
    count; per defect its image, kind, first pixel, size and amplitude."""
    counts = defects.groupby("tilt").size()
    per_tilt = pd.DataFrame({
        "rlnTomoName": name,
        "rlnMicrographName": files,
        "rlnTomoNominalStageTiltAngle": tilts["rlnTomoNominalStageTiltAngle"].to_numpy(),
        "rlnDefocusU": tilts["rlnDefocusU"].to_numpy(),
        "rlnDefocusV": tilts["rlnDefocusV"].to_numpy(),
        "rlnDefocusAngle": tilts["rlnDefocusAngle"].to_numpy(),
        "rlnTomoHand": params.hand,
        "subtomoSampleThicknessNm": params.thickness_nm,
        "subtomoDark": [int(f in params.dark_tilts) for f in range(len(files))],
        "subtomoDefects": [int(counts.get(f, 0)) for f in range(len(files))],
    })  # fmt: skip
    table = defects.copy()
    table.insert(0, "rlnMicrographName", [files[f] for f in table["tilt"]])
    return per_tilt, table.drop(columns="tilt")


@dataclass
class DetectorSeries:
    """One simulated tilt series as the detector records it, with its truth.

    ``global_row`` / ``tilts``: RELION 5 tables (tilts in ascending angle; the central CTF in
    rlnDefocusU/V/Angle is the truth, as is ``global_row["rlnTomoHand"]``); ``images``
    ``(t, h, w)`` float32 counts; ``defect_mask`` and ``defects`` the injected defects
    (the dark rows are ``params.dark_tilts``).
    """

    name: str
    global_row: dict
    tilts: pd.DataFrame
    images: torch.Tensor
    params: DetectorParams
    defect_mask: torch.Tensor
    defects: pd.DataFrame = field(repr=False)


def detector_series(
    name: str = "TS_01",
    *,
    params: DetectorParams | None = None,
    image_size: tuple[int, int] = (512, 512),
    pixel_size: float = 2.0,
    tilt_range: float = 60.0,
    tilt_step: float = 6.0,
    tilt_axis_deg: float = 85.0,
    defocus_um: float = 2.5,
    defocus_spread_um: float = 0.3,
    astigmatism_um: float = 0.06,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.07,
    seed: int = 0,
) -> DetectorSeries:
    """A tilt series of sample background only (no particles): tables, images and truth."""
    params = params or DetectorParams()
    rng = np.random.default_rng(seed)
    scheme = tilt_scheme(tilt_range, tilt_step, 3.0)
    t = len(scheme.angles_deg)
    du, dv, dang = tilt_defocus(rng, t, defocus_um, defocus_spread_um, astigmatism_um)
    tilts = pd.DataFrame(
        {
            "rlnMicrographPreExposure": scheme.pre_exposure,
            "rlnDefocusU": du,
            "rlnDefocusV": dv,
            "rlnDefocusAngle": dang,
            "rlnTomoNominalStageTiltAngle": scheme.angles_deg,
            "rlnTomoNominalTiltAxisAngle": tilt_axis_deg,
            "rlnTomoNominalDefocus": -defocus_um,
        }
    )
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    background = sample_background(
        image_size, pixel_size, (voltage, cs, amplitude_contrast), tilts, params, generator
    )
    dose = torch.full((t, 1, 1), params.dose_per_px)
    dose[list(params.dark_tilts)] *= params.dark_fraction
    images = torch.poisson((dose * (1 + background)).clamp(min=0), generator=generator)
    images, mask, defects = add_defects(images, params, rng, math.sqrt(params.dose_per_px))
    w, h = image_size
    global_row = {
        "rlnTomoName": name,
        "rlnVoltage": voltage,
        "rlnSphericalAberration": cs,
        "rlnAmplitudeContrast": amplitude_contrast,
        "rlnMicrographOriginalPixelSize": pixel_size,
        "rlnTomoHand": params.hand,
        "rlnTomoTiltSeriesPixelSize": pixel_size,
        "rlnTomoSizeX": w,
        "rlnTomoSizeY": h,
        "rlnTomoSizeZ": 2 * round(params.thickness_nm * 5 / pixel_size + 1),
        "rlnTomoImportFractionalDose": 3.0,
    }
    return DetectorSeries(name, global_row, tilts, images, params, mask, defects)


def write_detector_series(
    series: list[DetectorSeries], directory: str | Path, *, hand_written: int | None = None
) -> Path:
    """Write ``tomograms.star``, ``tilt_series/<name>.star``, one MRC per tilt and the truth
    (``detector_truth.star``: per tilt the true central CTF, thickness and hand, dark flag
    and defect count; ``defects.star``: every defect) under ``directory``; paths in the STAR
    files are relative to it (run jobs from there). The written tables carry no CTF (it is
    what estimation must find) and ``rlnTomoHand = hand_written`` (default: the true hand).
    Returns the ``tomograms.star`` path.
    """
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(directory):
        return _write_series(series, hand_written)


def _write_series(series: list[DetectorSeries], hand_written: int | None) -> Path:
    truth_rows, defect_tables, tables, rows = [], [], {}, []
    for s in series:
        px = s.global_row["rlnTomoTiltSeriesPixelSize"]
        names = [f"tilt_series/{s.name}/{s.name}_{a:+06.1f}.mrc"
                 for a in s.tilts["rlnTomoNominalStageTiltAngle"]]  # fmt: skip
        for file, image in zip(names, s.images, strict=True):
            write_mrc(file, image, px)
        table = s.tilts.drop(columns=["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"])
        table.insert(0, "rlnMicrographName", names)
        tables[s.name] = table
        row = dict(s.global_row)
        if hand_written is not None:
            row["rlnTomoHand"] = hand_written
        rows.append(row)
        per_tilt, defects = truth_tables(s.name, names, s.tilts, s.params, s.defects)
        truth_rows.append(per_tilt)
        defect_tables.append(defects)
    TomogramSet.from_tables(pd.DataFrame(rows), tables).write("tomograms.star", "tilt_series")
    write_star("detector_truth.star",
               {"tilts": pd.concat(truth_rows, ignore_index=True)})  # fmt: skip
    write_star("defects.star", {"defects": pd.concat(defect_tables, ignore_index=True)})
    return Path("tomograms.star").resolve()
