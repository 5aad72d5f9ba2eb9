"""Motion correction (``subtomo motioncorr``, RELION 5's "Motion correction" job, tomo mode).

For every tilt movie of an imported tilt-series set (``Import/jobNNN/tilt_series.star``):
frames are read from disk in batches, multiplied by the gain reference, Fourier transformed
in small groups in reused buffers and kept as spectra (memory: one movie); EER movies are
rendered as RELION renders them (``--eer_grouping`` EER frames per frame, required: an EER
without it is an error naming the file; ``--eer_upsampling`` 2 for the 2x finer grid, the
sensor-sized gain upsampled with it; :mod:`subtomo.io.eer`); the whole-frame drift is estimated
(:func:`subtomo.tilt.motion.align_frames`); the aligned frames are summed (optionally dose
weighted within the tilt), Fourier-cropped by ``--bin_factor`` and written. Files in
``MotionCorr/jobNNN/``, named as RELION names them (the movie path without its extension,
every ``.`` replaced by ``_``):

- ``<root>.mrc``: the aligned sum (pixel size = movie pixel × bin factor);
- ``<root>.star``: ``data_general`` and ``data_global_shift`` (rlnMicrographShiftX/Y in
  unbinned movie pixels, frame 1 = 0, RELION's sign: the shift that aligns each frame), as
  ``relion_run_motioncorr`` writes them;
- ``<root>_EVN.mrc`` / ``<root>_ODD.mrc`` (``--even_odd_split``): sums of the frames with
  0-based even / odd index, aligned, not dose weighted;
- ``corrected_tilt_series.star`` and ``tilt_series/<name>.star``: the input tables, rows in
  pre-exposure order, with rlnMicrographName, rlnMicrographMetadata,
  [rlnMicrographNameEven/Odd] and rlnAccumMotionTotal/Early/Late (movie pixels; the
  early/late split at 4 e/Å² with RELION's tomo-mode dose rate of 1 e/Å² per frame unless
  ``--dose_per_frame`` is given); rlnTomoTiltSeriesPixelSize = movie pixel × bin factor;
- ``motion.png`` (accumulated motion per tilt) and ``report.html``.

Dose weighting (``--dose_weighting``, off as in RELION's tomo mode, where the later jobs
weight each tilt by its pre-exposure) uses the frames' dose *within* the tilt only, so the
tilt's pre-exposure is not applied twice. Under torch.distributed the movies are shared out
over the ranks, each writing its movies' sums and motion STARs; rank 0 writes the tables.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from rich.progress import Progress

from subtomo.ctf import dose_weights
from subtomo.data import TomogramSet
from subtomo.device import resolve_device
from subtomo.distributed import all_gather_object, own_files, shard
from subtomo.errors import InputError
from subtomo.io import as_written, read_star, write_mrc, write_star
from subtomo.io.movies import (
    MovieHeader,
    read_gain,
    read_movie_arrays,
    read_movie_header,
    render_eer,
)
from subtomo.project import run_job, write_job_report
from subtomo.project.options import device_option, option, output_dir_option
from subtomo.report.plots import plot_series
from subtomo.tilt.local_motion import fit_motion_model, local_shifts, patch_residuals, unwarp
from subtomo.tilt.motion import (
    accumulated_motion,
    align_frames,
    crop_shape,
    fourier_crop,
    irfft2_by_rows,
    phase_ramp,
    shifted_sum,
)

__all__ = ["MotionCorrParams", "correct_movie", "output_root", "run"]

log = logging.getLogger("subtomo")

NODE_TYPE = "TomogramGroupMetadata.star.relion.tomo.motioncorr"
_FFT_PIXELS = 1 << 25  # frame pixels per FFT call at most: two 4k frames, one per thread


@dataclass
class MotionCorrParams:
    """Options of "Motion correction" (RELION program flag names)."""

    input_star: str = option(..., "--i", help="Imported tilt series (tilt_series.star).")
    bin_factor: float = option(1.0, "--bin_factor", help="Fourier-crop the sums by this factor.")
    bfactor: float = option(150.0, "--bfactor", help="B-factor for the alignment.", unit="Å²")
    align_angpix: float = option(
        4.0, "--align_angpix", help="Align on frequencies up to this pixel size's Nyquist.",
        unit="Å",
    )  # fmt: skip
    max_iter: int = option(10, "--max_iter", help="Most alignment iterations per movie.")
    gain_ref: str = option("", "--gain_ref", help="Gain reference (MRC/TIFF), multiplied.")
    gain_rot: int = option(0, "--gain_rot", help="Rotate the gain by n x 90° clockwise.")
    gain_flip: int = option(
        0, "--gain_flip", help="Then flip it: 0 no, 1 upside down, 2 left-right."
    )
    dose_weighting: bool = option(
        False, "--dose_weighting", help="Weight the frames by their dose within the tilt."
    )
    dose_per_frame: float = option(
        -1.0, "--dose_per_frame",
        help="Dose per frame; <= 0: from the pre-exposures (weighting), 1 (accumulated motion).",
        unit="e/Å²",
    )  # fmt: skip
    patch_x: int = option(1, "--patch_x", help="Patches in x for local motion; 1 x 1: none.")
    patch_y: int = option(1, "--patch_y", help="Patches in y for local motion.")
    even_odd_split: bool = option(
        False, "--even_odd_split", help="Also write sums of the even and odd frames."
    )
    eer_grouping: int = option(
        0, "--eer_grouping", help="EER movies: EER frames summed into one frame (required)."
    )
    eer_upsampling: int = option(
        1, "--eer_upsampling", help="EER movies: 1 = sensor grid (4K), 2 = twice finer (8K)."
    )
    float16: bool = option(False, "--float16/--float32", help="Half-precision sums.")
    batch: int = option(4, "--batch", help="Frames read and transformed at once.")
    only_do_unfinished: bool = option(
        False, "--only_do_unfinished",
        help="With --o of an earlier run: keep the movies it finished (motion STAR written).",
    )  # fmt: skip
    device: str = device_option()
    output_dir: str | None = output_dir_option()
    project_dir: str = "."


def output_root(movie: str) -> str:
    """RELION's name of a movie's outputs: the path without its extension, ``.`` -> ``_``
    (``frames/TS_01_000_0.0.tif`` -> ``frames/TS_01_000_0_0``)."""
    path = Path(movie)
    stem = path.with_suffix("").as_posix().lstrip("/")
    return stem.replace(".", "_")


@dataclass(frozen=True)
class CorrectedMovie:
    """The sums (real ``(h', w')`` float32 on the CPU), the shifts ``(t, 2)`` px, the
    alignment iterations and the local motion model's 36 coefficients (``None`` without
    patches) of one movie."""

    total: torch.Tensor
    even: torch.Tensor | None
    odd: torch.Tensor | None
    shifts: np.ndarray
    iterations: int
    coefficients: np.ndarray | None = None


def _reused(
    workspace: dict[str, torch.Tensor] | None,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """An uninitialised ``shape`` tensor: the leading part of the one kept under ``name`` in
    ``workspace`` when that is large enough, else a new one kept there. A 4k movie's spectra
    (671 MB for 10 frames) allocated afresh for every movie come back from the system as
    new pages: 164 000 page faults, whose zeroing cost ~0.6 CPU s per movie."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    kept = workspace.get(name)
    if (kept is None or kept.dtype != dtype or kept.device != device
            or kept.shape[1:] != shape[1:] or kept.shape[0] < shape[0]):  # fmt: skip
        workspace.pop(name, None)  # freed before its successor is allocated
        kept = workspace[name] = torch.empty(shape, dtype=dtype, device=device)
    return kept[: shape[0]]


def correct_movie(
    header: MovieHeader,
    gain: torch.Tensor | None,
    params: MotionCorrParams,
    pixel_size: float,
    dose_per_frame: float | None,
    device: torch.device,
    workspace: dict[str, torch.Tensor] | None = None,
) -> CorrectedMovie:
    """Align and sum one movie (frames streamed from disk; spectra of one movie in memory).
    ``workspace`` keeps the spectra and frame buffers for the next movie (:func:`_reused`)."""
    spectra = _reused(
        workspace, "spectra", (header.n_frames, header.shape[0], header.shape[1] // 2 + 1),
        torch.complex64, device,
    )  # fmt: skip
    # frames are transformed in groups of up to 32 Mpixel: one FFT call costs ~8 ms besides
    # the transform (512²: 14x faster in groups of 4); a 4k frame's buffer is 67 MB
    group = max(1, min(params.batch, _FFT_PIXELS // (header.shape[0] * header.shape[1])))
    buffer = _reused(workspace, "frames", (group, *header.shape), torch.float32, device)
    on_cpu = device.type == "cpu"
    gain_np = gain.numpy() if gain is not None and on_cpu else None
    index = 0
    for frames in read_movie_arrays(header, params.batch):
        for start in range(0, len(frames), group):
            counts = frames[start : start + group]
            batch = buffer[: len(counts)]
            if on_cpu:  # counts (a flipped or memory-mapped view) to float32 in one pass
                np.copyto(batch.numpy(), counts, casting="unsafe")
                if gain_np is not None:
                    np.multiply(batch.numpy(), gain_np, out=batch.numpy())
            else:  # the counts go to the device in their own dtype, converted there
                native = counts.dtype.newbyteorder("=")
                batch.copy_(torch.from_numpy(np.array(counts, dtype=native)))
                if gain is not None:
                    batch.mul_(gain)
            torch.fft.rfft2(batch, out=spectra[index : index + len(counts)])
            index += len(counts)
    del buffer, batch
    alignment = align_frames(
        spectra, pixel_size, bfactor=params.bfactor, align_pixel_size=params.align_angpix,
        max_iterations=params.max_iter,
    )  # fmt: skip
    shifts = alignment.shifts.to(torch.float32)
    coefficients = None
    if params.patch_x * params.patch_y > 1:
        residuals, centres = patch_residuals(
            spectra, alignment.shifts, pixel_size, (params.patch_x, params.patch_y),
            align_pixel_size=params.align_angpix, bfactor=params.bfactor,
        )  # fmt: skip
        coefficients, used = fit_motion_model(residuals, centres)
        log.info("%s: local motion from %d of %d patches", header.path, int(used.sum()), len(used))
        for i in range(header.n_frames):  # spectra of the frames with all motion undone
            ramp = phase_ramp(header.shape, -shifts[i : i + 1])[0]
            aligned = irfft2_by_rows(spectra[i] * ramp, header.shape)
            field = local_shifts(coefficients, i, header.shape).to(aligned.dtype)
            spectra[i] = torch.fft.rfft2(unwarp(aligned, field))
        shifts = torch.zeros_like(shifts)
    out_shape = crop_shape(header.shape, params.bin_factor)

    def image(spectrum: torch.Tensor) -> torch.Tensor:
        if out_shape != header.shape:
            spectrum = fourier_crop(spectrum, out_shape)
        return irfft2_by_rows(spectrum, out_shape).cpu()

    weights = None
    if params.dose_weighting and dose_per_frame is not None:
        doses = dose_per_frame * torch.arange(header.n_frames, device=device, dtype=torch.float64)
        weights = dose_weights(doses, pixel_size, header.shape, device=device)  # (t, h, w')
    even = odd = total_sum = None
    if params.even_odd_split:
        even_sum = shifted_sum(spectra[0::2], shifts[0::2])
        odd_sum = shifted_sum(spectra[1::2], shifts[1::2])
        even, odd = image(even_sum), image(odd_sum)
        if weights is None:
            total_sum = even_sum + odd_sum
    if total_sum is None:
        total_sum = shifted_sum(spectra, shifts, weights)
    total = image(total_sum)
    return CorrectedMovie(
        total, even, odd, alignment.shifts.cpu().numpy(), alignment.iterations,
        None if coefficients is None else coefficients.numpy(),
    )  # fmt: skip


def _motion_star(
    path: Path, header: MovieHeader, movie: str, params: MotionCorrParams, row: pd.Series,
    pixel_size: float, voltage: float, shifts: np.ndarray, dose_rate: float,
    coefficients: np.ndarray | None,
) -> None:  # fmt: skip
    """RELION's per-movie motion file (``Micrograph::write``): data_general,
    data_global_shift and, with patches, data_local_motion_model (the 36 coefficients of
    the correction, :mod:`subtomo.tilt.local_motion`)."""
    general: dict[str, object] = {
        "rlnImageSizeX": header.shape[1],
        "rlnImageSizeY": header.shape[0],
        "rlnImageSizeZ": header.n_frames,
        "rlnMicrographMovieName": movie,
    }
    if params.gain_ref:
        general["rlnMicrographGainName"] = params.gain_ref
    general |= {
        "rlnMicrographBinning": float(params.bin_factor),
        "rlnMicrographOriginalPixelSize": pixel_size,
        "rlnMicrographDoseRate": dose_rate,
        "rlnMicrographPreExposure": float(row["rlnMicrographPreExposure"]),
        "rlnVoltage": voltage,
        "rlnMicrographStartFrame": 1,
    }
    if header.is_eer:
        general |= {"rlnEERUpsampling": header.eer_upsampling,
                    "rlnEERGrouping": header.eer_grouping}  # fmt: skip
    general["rlnMotionModelVersion"] = 0 if coefficients is None else 1
    shift_table = pd.DataFrame(
        {
            "rlnMicrographFrameNumber": np.arange(1, len(shifts) + 1),
            "rlnMicrographShiftX": -shifts[:, 0].astype(np.float64),  # RELION: -s
            "rlnMicrographShiftY": -shifts[:, 1].astype(np.float64),
        }
    )
    blocks: dict[str, object] = {"general": general, "global_shift": shift_table}
    if coefficients is not None:
        blocks["local_motion_model"] = pd.DataFrame(
            {"rlnMotionModelCoeffsIdx": np.arange(36), "rlnMotionModelCoeff": -coefficients}
        )
    write_star(path, blocks)


def read_motion_star(path: str | Path) -> tuple[dict, np.ndarray]:
    """``(data_general, shifts (t, 2) xy movie px)`` of a per-movie motion STAR file, the
    shifts as written (RELION's: the correction ``-s``, :mod:`subtomo.tilt.motion`)."""
    blocks = read_star(path)
    shift = blocks.get("global_shift")
    if shift is None or "general" not in blocks:
        raise InputError("not a motion file: no data_general / data_global_shift", file=path)
    return dict(blocks["general"]), shift[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy()


def _tilt_doses(tilts: pd.DataFrame) -> np.ndarray:
    """Dose of each tilt (e/Å²): the next pre-exposure in time minus its own; the last tilt
    gets the median of the others (0 when unknown)."""
    pre = tilts["rlnMicrographPreExposure"].to_numpy(np.float64)
    order = np.argsort(pre, kind="stable")
    steps = np.diff(pre[order])
    doses = np.empty(len(pre))
    doses[order[:-1]] = steps
    doses[order[-1]] = float(np.median(steps)) if len(steps) else 0.0
    return doses


@dataclass(frozen=True)
class _Work:
    """Checked inputs of one tilt series."""

    name: str
    tilts: pd.DataFrame  # pre-exposure order
    headers: list[MovieHeader]
    pixel_size: float
    voltage: float


def _check_inputs(
    params: MotionCorrParams, tomos: TomogramSet
) -> tuple[list[_Work], np.ndarray | None]:
    """Every movie present, complete and of the frame count its table says; one frame size;
    the gain of that size. ``InputError`` naming the file otherwise."""
    if params.bin_factor < 1:
        raise InputError(f"--bin_factor {params.bin_factor:g} must be >= 1")
    if params.gain_flip not in (0, 1, 2):
        raise InputError(f"--gain_flip {params.gain_flip} must be 0, 1 or 2")
    if min(params.patch_x, params.patch_y, params.batch, params.max_iter) < 1:
        raise InputError("--patch_x, --patch_y, --batch and --max_iter must be >= 1")
    work, shapes = [], {}
    for series in tomos:
        tilts = series.tilts
        source = series.tilt_file
        if "rlnMicrographMovieName" not in tilts.columns:
            raise InputError(
                "missing required column (import movies, not motion-corrected images)",
                file=source, block=series.name, column="rlnMicrographMovieName",
            )  # fmt: skip
        tilts = tilts.sort_values("rlnMicrographPreExposure", kind="stable").reset_index(drop=True)
        headers = []
        for i, movie in enumerate(tilts["rlnMicrographMovieName"].astype(str)):
            header = read_movie_header(movie)
            if "rlnTomoTiltMovieFrameCount" in tilts.columns:
                expected = int(tilts["rlnTomoTiltMovieFrameCount"].iloc[i])
                if expected != header.n_frames:
                    raise InputError(
                        f"{header.n_frames} frames, but {source} lists {expected}", file=movie
                    )
            shapes.setdefault(header.shape, movie)  # the sensor's, before EER rendering
            headers.append(render_eer(header, params.eer_grouping, params.eer_upsampling))
        row = series.row
        px = float(row.get("rlnMicrographOriginalPixelSize", np.nan))
        if not px > 0:
            raise InputError(
                "missing or non-positive rlnMicrographOriginalPixelSize",
                file=tomos.source, block="global",
            )  # fmt: skip
        work.append(_Work(series.name, tilts, headers, px, float(row.get("rlnVoltage", 300.0))))
    if len(shapes) > 1:
        (a, first), (b, second) = list(shapes.items())[:2]
        raise InputError(
            f"frames are {b[1]} x {b[0]} px, but {first} has {a[1]} x {a[0]}", file=second
        )
    gain = None
    if params.gain_ref and work:
        gain = read_gain(params.gain_ref, next(iter(shapes)), params.gain_rot, params.gain_flip)
        scale = work[0].headers[0].eer_upsampling  # an EER gain is the sensor's: upsample it
        gain = np.repeat(np.repeat(gain, scale, axis=0), scale, axis=1)
    return work, gain


def _keep_freed_memory() -> None:
    """Let glibc serve frame-sized blocks from its heap and keep up to 128 MB of freed memory
    instead of returning every block to the system: each 4k-frame temporary (67 MB) otherwise
    comes back as fresh pages, whose faults cost more than the FFT (measured: irfft2 of a 4k
    frame 222 -> 131 ms; a 4k movie 3.8 -> 3.0 CPU s, peak RSS 1.6 -> 1.6-1.8 GB; keeping
    all freed memory saved no more CPU and peaked at 2.1 GB). No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: heap, not mmap, for blocks up to 1 GiB
    libc.mallopt(-1, 1 << 27)  # M_TRIM_THRESHOLD: keep up to 128 MB freed at the heap's top


def _huge_pages() -> None:
    """Ask torch's CPU allocator for transparent huge pages (2 MB; ``THP_MEM_ALLOC_ENABLE``,
    read at the first allocation of 2 MB or more, so it must be set before any: a process
    that made one already keeps its setting; a value the user set is kept). The pages of a
    movie's buffers are then faulted in 512x fewer faults: a 4k command on 3 movies made
    0.6-0.8 M page faults and spent 1.5-2.0 s in the kernel, with huge pages 0.1 M and
    1.2 s; user time unchanged, peak RSS 1.75-1.88 -> 1.86 GB. Used only where the kernel
    offers them on request (``madvise`` or ``always``)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def run(params: MotionCorrParams) -> dict[str, str]:
    """Run the job; returns ``{output path: RELION node type}``."""
    _huge_pages()
    device = resolve_device(params.device)
    _keep_freed_memory()
    tomos = TomogramSet.read(params.input_star)
    work, gain_np = _check_inputs(params, tomos)
    gain = None if gain_np is None else torch.from_numpy(gain_np).to(device)
    n_movies = sum(len(w.headers) for w in work)
    inputs = {params.input_star: "TomogramGroupMetadata.star.relion.tomo.import"}
    with run_job(
        "MotionCorr", params, output_dir=params.output_dir, project_dir=params.project_dir,
        inputs=inputs,
    ) as (job, outputs):  # fmt: skip
        tables, plot_curves, labels = {}, {}, []
        doses = [_frame_doses(params, item) for item in work]
        movies = shard([(k, i) for k, item in enumerate(work) for i in range(len(item.headers))])
        with Progress(transient=True) as bar, own_files():
            task = bar.add_task("aligning movies", total=len(movies))
            mine, workspace = {}, {}  # workspace: buffers reused from movie to movie
            for k, i in movies:
                mine[k, i] = _correct_one(
                    params, job, work[k], i, doses[k], gain, device, workspace
                )
                bar.advance(task)
            del workspace
        motion = {key: m for shares in all_gather_object(mine) for key, m in shares.items()}
        for k, item in enumerate(work):
            tables[item.name] = _series_table(
                params, job, item, [motion[k, i] for i in range(len(item.headers))]
            )
            plot_curves[item.name] = tables[item.name]["rlnAccumMotionTotal"].tolist()
            labels = [f"{a:g}" for a in tables[item.name]["rlnTomoNominalStageTiltAngle"]]
        global_table = tomos.global_table.copy()
        px_out = global_table["rlnMicrographOriginalPixelSize"].astype(float) * params.bin_factor
        global_table = global_table.drop(
            columns=["rlnTomoTiltSeriesPixelSize", "rlnMicrographPixelSize"], errors="ignore"
        )
        at = list(global_table.columns).index("rlnMicrographOriginalPixelSize") + 1
        global_table.insert(at, "rlnTomoTiltSeriesPixelSize", px_out.to_numpy())
        star = job.path("corrected_tilt_series.star")
        TomogramSet.from_tables(global_table, tables).write(star, job.path("tilt_series"))
        outputs[job.alias + "corrected_tilt_series.star"] = NODE_TYPE
        if len(plot_curves) == 1 and labels:
            plot_series(
                job.path("motion.png"), labels, plot_curves, xlabel="tilt (deg), dose order",
                ylabel="accumulated motion (px)", title="whole-frame motion per tilt",
            )  # fmt: skip
        log.info("Motion-corrected %d movies of %d tilt series", n_movies, len(work))
        write_job_report(job, outputs)
    return outputs


def _frame_doses(params: MotionCorrParams, item: _Work) -> np.ndarray | None:
    """Dose per frame (e/Å²) of each movie of a series for dose weighting; None: none."""
    if params.dose_per_frame > 0:
        return np.full(len(item.tilts), params.dose_per_frame)
    if not params.dose_weighting:
        return None
    frame_dose = _tilt_doses(item.tilts) / np.array([h.n_frames for h in item.headers])
    if not (frame_dose > 0).all():
        raise InputError(
            "--dose_weighting needs --dose_per_frame: the pre-exposures give no dose",
            file=params.input_star,
        )
    return frame_dose


def _correct_one(
    params: MotionCorrParams, job, item: _Work, i: int, frame_dose: np.ndarray | None,
    gain: torch.Tensor | None, device: torch.device,
    workspace: dict[str, torch.Tensor] | None = None,
) -> tuple[float, float, float]:  # fmt: skip
    """Correct movie ``i`` of a series and write its sums and motion STAR (or, with
    ``--only_do_unfinished``, read back a finished one); its accumulated motion
    (total, early, late; movie pixels)."""
    header = item.headers[i]
    movie = str(item.tilts["rlnMicrographMovieName"].iloc[i])
    rate = params.dose_per_frame if params.dose_per_frame > 0 else 1.0
    root = job.path(output_root(movie))
    root.parent.mkdir(parents=True, exist_ok=True)
    suffixes = ("", "_EVN", "_ODD") if params.even_odd_split else ("",)
    done = [root.with_name(root.name + suffix + ".mrc") for suffix in suffixes]
    if params.only_do_unfinished and all(p.is_file() for p in [*done, root.with_suffix(".star")]):
        shifts, iterations = -read_motion_star(root.with_suffix(".star"))[1], 0
    else:
        dose = None if frame_dose is None else float(frame_dose[i])
        result = correct_movie(header, gain, params, item.pixel_size, dose, device, workspace)
        px_out = item.pixel_size * params.bin_factor
        for path, sum_image in zip(done, (result.total, result.even, result.odd), strict=False):
            write_mrc(path, sum_image, px_out, float16=params.float16)
        # written last: its presence marks the movie done (--only_do_unfinished)
        _motion_star(
            root.with_suffix(".star"), header, movie, params, item.tilts.iloc[i],
            item.pixel_size, item.voltage, result.shifts, rate, result.coefficients,
        )  # fmt: skip
        # the accumulated motion from the shifts as written, as a resumed run reads them
        # back: both give the same table
        shifts = as_written(result.shifts)
        iterations = result.iterations
    pre = float(item.tilts["rlnMicrographPreExposure"].iloc[i])
    motion = accumulated_motion(shifts, pre, rate)
    log.info(
        "%s: %d frames, drift %.2f px in %d iterations", movie, header.n_frames, motion[0],
        iterations,
    )  # fmt: skip
    return motion


def _series_table(
    params: MotionCorrParams, job, item: _Work, motion: list[tuple[float, float, float]]
) -> pd.DataFrame:
    """A series' per-tilt table with the outputs' names and the accumulated ``motion``."""
    tilts = item.tilts.copy()
    aliases = [job.alias + output_root(str(m)) for m in tilts["rlnMicrographMovieName"]]
    tilts["rlnMicrographName"] = [a + ".mrc" for a in aliases]
    tilts["rlnMicrographMetadata"] = [a + ".star" for a in aliases]
    if params.even_odd_split:
        tilts["rlnMicrographNameEven"] = [a + "_EVN.mrc" for a in aliases]
        tilts["rlnMicrographNameOdd"] = [a + "_ODD.mrc" for a in aliases]
    values = np.array(motion)
    for k, column in enumerate(("Total", "Early", "Late")):
        tilts[f"rlnAccumMotion{column}"] = values[:, k]
    return tilts
