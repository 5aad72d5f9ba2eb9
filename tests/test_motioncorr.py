"""Motion correction: drift recovered from simulated counting movies at 3 e/Å² per tilt, the
sign conventions of the simulator and the corrector agree, RELION's files and columns, and
bad input as one error line with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from subtomo.cli import main as cli
from subtomo.data import TomogramSet
from subtomo.errors import InputError
from subtomo.io import read_mrc, read_star, write_mrc, write_star
from subtomo.io.movies import orient_gain, read_gain, unorient_gain
from subtomo.jobs.motioncorr import output_root, read_motion_star
from subtomo.simulate.movies import (
    drift_trajectory,
    gain_pattern,
    local_deformation,
    simulate_movie,
    specimen_texture,
)
from subtomo.tilt.motion import (
    _integer_peaks,
    _peaks,
    _ramp_factors,
    _SeparableTerm,
    accumulated_motion,
    align_frames,
    fft_size,
    fourier_crop,
    irfft2_by_rows,
    shifted_sum,
)


@pytest.mark.parametrize("seed", [1, 2])
def test_drift_within_half_a_pixel_at_3_e_per_tilt(seed, device):
    """512² frames at 1.5 Å/px, 3 e/Å² in 10 frames (0.68 e/px per frame), 10 % specimen
    contrast, a gain pattern corrected before alignment: RMS error < 0.5 px (a wrong sign or
    an alignment to the frame's own noise gives errors of the drift's size, ~5 px)."""
    rng = np.random.default_rng(seed)
    shape = (512, 512)
    truth = drift_trajectory(10, 5.0, rng)
    sensitivity = gain_pattern(shape, rng)
    movie = simulate_movie(
        specimen_texture(shape, 1.5, rng), pixel_size=1.5, dose=3.0, n_frames=10,
        shifts=truth, sensitivity=sensitivity, rng=rng,
    )  # fmt: skip
    frames = (movie.frames / torch.from_numpy(sensitivity)).to(device)
    shifts = align_frames(torch.fft.rfft2(frames), 1.5).shifts.cpu().numpy()
    rms = np.sqrt(((shifts - truth) ** 2).sum(axis=1).mean())
    assert rms < 0.5, rms


def test_aligned_sum_undoes_the_simulated_drift():
    """Noise-free frames moved by the simulator and summed with the true shifts give back
    t x the specimen: simulator and corrector share one shift convention."""
    rng = np.random.default_rng(0)
    image = torch.from_numpy(specimen_texture((64, 64), 2.0, rng, resolution=12.0))
    truth = drift_trajectory(5, 3.0, rng)
    from subtomo.simulate.movies import _moved

    frames = torch.stack([_moved(image, torch.from_numpy(s), None) for s in truth])
    total = torch.fft.irfft2(
        shifted_sum(torch.fft.rfft2(frames), torch.from_numpy(truth).float()), s=(64, 64)
    )
    torch.testing.assert_close(total / 5, image, atol=1e-4, rtol=0)


def test_fft_size_is_even_and_7_smooth():
    """692 = 4 x 173 -> 700 = 2² 5² 7; sizes that are fast already are kept."""
    assert fft_size(692) == 700
    assert [fft_size(n) for n in (2, 512, 686, 1382)] == [2, 512, 686, 1400]
    for n in range(2, 400):
        m = fft_size(n)
        assert m >= n and m % 2 == 0 and m - n < 20


@pytest.mark.parametrize("shape", [(46, 46), (44, 38)])
def test_integer_peaks_on_the_padded_grid(shape):
    """A correlation peak at a known integer offset is found there after zero-padding the
    spectra to fast sizes (46 -> 48, 38 -> 40): wrong padding of the negative frequencies
    or a wrong scale back to the grid would put it elsewhere."""
    h, w = shape
    truth = torch.tensor([[3, -5], [-7, 4], [0, 0], [-w // 2 + 2, h // 2 - 2]])  # xy
    images = torch.zeros(len(truth), h, w)
    for k, (x, y) in enumerate(truth.tolist()):
        images[k, y % h, x % w] = 1.0
    images = images + 0.01 * torch.rand(images.shape, generator=torch.Generator().manual_seed(0))
    ix, iy = _integer_peaks(torch.fft.rfft2(images), shape, None)
    assert torch.equal(torch.stack([ix, iy], dim=1), truth)
    # a radius limit excludes the far peak
    ix, iy = _integer_peaks(torch.fft.rfft2(images), shape, 10.0)
    assert (ix[:3] == truth[:3, 0]).all() and (ix[3] ** 2 + iy[3] ** 2) <= 100


def test_separable_term_matches_the_materialised_correlation():
    """The peaks of ``conj(S) C - |C|² conj(R)`` with the second term inside the matrix DFT
    equal those of the correlation with the other frames' sum built in full (the identity
    the alignment's iterations rely on)."""
    gen = torch.Generator().manual_seed(1)
    shape = (48, 40)
    spectra = torch.fft.rfft2(torch.randn(6, *shape, generator=gen))
    shifts = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    ey, ex = _ramp_factors(shape, -shifts)
    aligned = spectra * ey[:, :, None] * ex[:, None, :]
    full = (aligned.sum(0)[None] - aligned).conj() * spectra
    total = aligned.sum(0).conj()
    power = spectra.real.square() + spectra.imag.square()
    own = _SeparableTerm(power, ey.conj(), ex.conj())
    guess = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    expected = _peaks(full.clone(), shape, 10, guess)
    got = _peaks(spectra * total, shape, 10, guess, None, own)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
    expected = _peaks(full.clone(), shape, 10, None)
    got = _peaks(spectra * total, shape, 10, None, None, own)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("block_bytes", [1, 1000, 1 << 19])
def test_shifted_sum_in_blocks_of_rows(monkeypatch, block_bytes):
    """The blocked sum (1 row, a few rows with a ragged last block, all rows) equals the
    sum written out in full, with and without dose weights."""
    import subtomo.tilt.motion as motion

    monkeypatch.setattr(motion, "_BLOCK_BYTES", block_bytes)
    gen = torch.Generator().manual_seed(2)
    shape = (30, 24)
    spectra = torch.fft.rfft2(torch.randn(5, *shape, generator=gen))
    shifts = 3 * torch.randn(5, 2, generator=gen)
    weights = torch.rand(spectra.shape, generator=gen) + 0.1
    ramps = motion.phase_ramp(shape, -shifts)
    expected = (spectra * ramps).sum(0)
    torch.testing.assert_close(shifted_sum(spectra, shifts), expected, atol=1e-4, rtol=1e-5)
    norm = (5 / weights.square().sum(0)).sqrt()
    expected = (spectra * ramps * weights * norm).sum(0)
    torch.testing.assert_close(
        shifted_sum(spectra, shifts, weights), expected, atol=1e-4, rtol=1e-5
    )


@pytest.mark.parametrize("shape", [(64, 48), (30, 22), (16, 15)])
def test_irfft2_by_rows_is_irfft2(shape):
    """The row-wise inverse equals torch's 2D one (even and odd sizes)."""
    spectrum = torch.fft.rfft2(torch.randn(shape, generator=torch.Generator().manual_seed(3)))
    expected = torch.fft.irfft2(spectrum, s=shape)
    torch.testing.assert_close(irfft2_by_rows(spectrum, shape), expected, atol=1e-5, rtol=0)


def test_local_deformation_is_smooth_and_net_free():
    field = local_deformation(8, 2.0, np.random.default_rng(3))
    assert field.shape == (8, 2, 9, 9)
    np.testing.assert_allclose(field[0], 0.0)
    np.testing.assert_allclose(field.mean(axis=(2, 3)), 0.0, atol=1e-12)


def test_accumulated_motion_relion_rule():
    """Path length over frames 2..t; steps with 1-based frame n <= (4 - pre)/dose are early."""
    shifts = np.array([[0, 0], [3, 4], [3, 5], [3, 7]], dtype=float)  # steps 5, 1, 2
    assert accumulated_motion(shifts, 0.0, 1.0) == pytest.approx((8.0, 8.0, 0.0))
    assert accumulated_motion(shifts, 1.0, 1.0) == pytest.approx((8.0, 6.0, 2.0))
    assert accumulated_motion(shifts, 2.0, 1.0) == pytest.approx((8.0, 5.0, 3.0))
    assert accumulated_motion(shifts, 10.0, 1.0) == pytest.approx((8.0, 0.0, 8.0))


def test_fourier_crop_keeps_a_band_limited_image():
    """An image with no power above the cropped Nyquist is its exact 2x downsample."""
    y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    image = 3 + torch.cos(2 * torch.pi * (3 * x + 5 * y) / 64)
    small = torch.fft.irfft2(fourier_crop(torch.fft.rfft2(image), (32, 32)), s=(32, 32))
    torch.testing.assert_close(small, image[::2, ::2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("rotation", range(4))
@pytest.mark.parametrize("flip", range(3))
def test_gain_orientation_round_trip(rotation, flip):
    gain = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(
        orient_gain(unorient_gain(gain, rotation, flip), rotation, flip), gain
    )


def test_gain_rotation_is_clockwise():
    """Row 0 on top: a clockwise quarter turn puts the first column's bottom at the top left."""
    gain = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(orient_gain(gain, 1), [[3.0, 1.0], [4.0, 2.0]])
    np.testing.assert_array_equal(orient_gain(gain, 0, 1), [[3.0, 4.0], [1.0, 2.0]])


def test_gain_of_wrong_shape():
    write_mrc("gain.mrc", np.ones((8, 6), np.float32), 1.0)
    with pytest.raises(InputError, match=r"gain\.mrc.*6 x 8 px.*8 x 6"):
        read_gain("gain.mrc", (6, 8))
    assert read_gain("gain.mrc", (6, 8), rotation=1).shape == (6, 8)


def test_real_relion_motioncorr_star_round_trips(shared_data):
    """RELION's motion-correction output (EMPIAR-10164 TS_01) reads, writes and reads back
    unchanged; it carries the per-tilt columns our MotionCorr job writes."""
    path = shared_data / "formats/relion5/motioncorr_corrected_micrographs_EMPIAR-10164_TS_01.star"
    blocks = read_star(path)
    table = blocks["micrographs"]
    for column in ("rlnMicrographName", "rlnMicrographMetadata", "rlnAccumMotionTotal",
                   "rlnAccumMotionEarly", "rlnAccumMotionLate"):  # fmt: skip
        assert column in table.columns
    np.testing.assert_allclose(
        table["rlnAccumMotionEarly"] + table["rlnAccumMotionLate"],
        table["rlnAccumMotionTotal"],
        atol=2e-6,
    )
    assert output_root(table["rlnMicrographName"].iloc[1].replace("_3_0.mrc", "_3.0.tif")) == (
        table["rlnMicrographName"].iloc[1].removesuffix(".mrc")
    )
    write_star("copy.star", blocks)
    back = read_star("copy.star")
    for name, block in blocks.items():
        assert back[name].equals(block)


def _simulated_project(*extra: str) -> None:
    argv = [
        "simulate", "--o", ".", "--tomograms", "1", "--particles", "6", "--tilt-range", "12",
        "--tilt-step", "6", "--movie-frames", "8", "--movie-gain-rot", "1",
        "--movie-gain-flip", "2", *extra,
    ]  # fmt: skip
    assert cli.run_cli(argv) == 0
    assert cli.run_cli(["import", "--movies", "frames/*", "--mdocs", "*.mdoc"]) == 0


def test_simulate_import_motioncorr_end_to_end():
    """Simulated TIFF movies (gain rotated and flipped on disk) -> import -> motioncorr:
    shifts match the truth, the corrected sum matches the tilt image, EVN + ODD = the sum,
    RELION's file names, blocks and columns."""
    _simulated_project("--movie-format", "tiff")
    argv = [
        "motioncorr", "--i", "Import/job001/tilt_series.star", "--gain_ref", "gain.mrc",
        "--gain_rot", "1", "--gain_flip", "2", "--even_odd_split", "--bin_factor", "2",
    ]  # fmt: skip
    assert cli.run_cli(argv) == 0
    job = Path("MotionCorr/job002")
    for name in ("corrected_tilt_series.star", "report.html", "motion.png"):
        assert (job / name).is_file()
    truth = read_star("motion_truth.star")["motion_truth"]
    tomos = TomogramSet.read(job / "corrected_tilt_series.star")
    assert tomos.global_table["rlnTomoTiltSeriesPixelSize"].iloc[0] == pytest.approx(20.0)
    tilts = tomos["TS_01"].tilts
    np.testing.assert_array_equal(np.diff(tilts["rlnMicrographPreExposure"]) > 0, True)
    for column in ("rlnMicrographName", "rlnMicrographMetadata", "rlnMicrographNameEven",
                   "rlnMicrographNameOdd", "rlnAccumMotionTotal"):  # fmt: skip
        assert column in tilts.columns
    reference = {p.stem: p for p in Path("tilt_series").rglob("*.mrc")}
    for _, row in tilts.iterrows():
        movie = row["rlnMicrographMovieName"]
        general, shifts = read_motion_star(row["rlnMicrographMetadata"])
        assert general["rlnMicrographMovieName"] == movie
        assert general["rlnImageSizeZ"] == 8
        expected = truth[truth["rlnMicrographMovieName"] == movie]
        error = shifts - expected[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy()
        assert np.sqrt((error**2).sum(axis=1).mean()) < 0.15
        total, px = read_mrc(row["rlnMicrographName"])
        even, _ = read_mrc(row["rlnMicrographNameEven"])
        odd, _ = read_mrc(row["rlnMicrographNameOdd"])
        assert px == pytest.approx(20.0) and total.shape == (128, 128)
        torch.testing.assert_close(even + odd, total, atol=1e-2, rtol=1e-4)
        image, _ = read_mrc(reference[Path(movie).stem])
        binned = image.reshape(128, 2, 128, 2).mean(dim=(1, 3))
        corr = torch.corrcoef(torch.stack([binned.flatten(), total.flatten()]))[0, 1]
        assert corr > 0.8, (movie, float(corr))


def _motioncorr_error(capsys, *extra: str) -> str:
    argv = ["motioncorr", "--i", "Import/job001/tilt_series.star", *extra]
    assert cli.run_cli(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert not Path("MotionCorr").exists()
    return lines[0]


def test_motioncorr_bad_input(capsys):
    """A gain of the wrong shape, a truncated movie and a missing movie: one line naming the
    file, no job directory."""
    _simulated_project()
    capsys.readouterr()
    write_mrc("small_gain.mrc", np.ones((100, 100), np.float32), 10.0)
    assert "small_gain.mrc" in _motioncorr_error(capsys, "--gain_ref", "small_gain.mrc")
    assert "--gain_flip 3" in _motioncorr_error(
        capsys, "--gain_ref", "gain.mrc", "--gain_flip", "3"
    )
    movie = sorted(Path("frames").glob("*.mrc"))[2]
    data = movie.read_bytes()
    movie.write_bytes(data[: len(data) // 2])
    message = _motioncorr_error(capsys)
    assert "truncated" in message and str(movie) in message
    movie.unlink()
    message = _motioncorr_error(capsys)
    assert "not found" in message and str(movie) in message


@pytest.mark.parametrize("name", ["movie.tif", "movie.mrc"])
def test_movie_round_trip_and_truncation(name):
    """Frames written and read back unchanged (TIFF rows flipped both ways, as RELION reads
    TIFF); a truncated file is an InputError naming it."""
    from subtomo.io.movies import read_movie_frames, read_movie_header, write_movie

    frames = np.random.default_rng(0).poisson(3.0, size=(5, 12, 10)).astype(np.float32)
    write_movie(name, frames, 1.5)
    header = read_movie_header(name)
    assert (header.n_frames, header.shape) == (5, (12, 10))
    back = torch.cat(list(read_movie_frames(header, 2))).float().numpy()
    np.testing.assert_array_equal(back, frames)
    data = Path(name).read_bytes()
    Path(name).write_bytes(data[: len(data) - 30] if name.endswith("mrc") else data[:300])
    with pytest.raises(InputError, match=name):
        read_movie_header(name)


def test_only_do_unfinished_redoes_missing_movies():
    """A second run into the same directory keeps finished movies (their motion STAR read
    back) and corrects the one whose outputs are gone; the tables come out the same."""
    _simulated_project()
    argv = ["motioncorr", "--i", "Import/job001/tilt_series.star", "--gain_ref", "gain.mrc",
            "--gain_rot", "1", "--gain_flip", "2"]  # fmt: skip
    assert cli.run_cli(argv) == 0
    job = Path("MotionCorr/job002")
    first = TomogramSet.read(job / "corrected_tilt_series.star")["TS_01"].tilts
    gone = sorted((job / "frames").glob("*.mrc"))[1]
    kept = sorted((job / "frames").glob("*.mrc"))[0]
    stamp = kept.stat().st_mtime_ns
    gone.unlink()
    assert cli.run_cli([*argv, "--o", str(job), "--only_do_unfinished"]) == 0
    assert gone.is_file() and kept.stat().st_mtime_ns == stamp
    again = TomogramSet.read(job / "corrected_tilt_series.star")["TS_01"].tilts
    pd.testing.assert_frame_equal(again, first, atol=1e-6)


def test_local_motion_model_recovers_the_simulated_deformation():
    """1024² frames at 2 Å/px, 3 e/Å² in 10 frames, a 3 px local deformation on top of the
    drift, 4 x 4 patches: RELION's polynomial model matches the true deformation within
    0.5 px RMS between the outer patch centres (the deformation is ~3 px at the last
    frame; ~4 px RMS error with every patch kept and no search limit)."""
    from subtomo.tilt.local_motion import fit_motion_model, model_shifts, patch_residuals

    rng = np.random.default_rng(0)
    shape = (1024, 1024)
    truth = drift_trajectory(10, 5.0, rng)
    field = local_deformation(10, 3.0, rng)
    movie = simulate_movie(
        specimen_texture(shape, 2.0, rng), pixel_size=2.0, dose=3.0, n_frames=10,
        shifts=truth, deformation=field, rng=rng,
    )  # fmt: skip
    spectra = torch.fft.rfft2(movie.frames)
    shifts = align_frames(spectra, 2.0).shifts
    residuals, centres = patch_residuals(spectra, shifts, 2.0, (4, 4))
    coefficients, used = fit_motion_model(residuals, centres)
    assert used.sum() >= 12  # a noisy patch may be left out
    u = torch.linspace(-0.5, 0.5, 9, dtype=torch.float64)[1:-1]  # within the patch centres
    model = model_shifts(coefficients, torch.arange(10.0)[:, None, None], u, u[:, None])
    true = torch.from_numpy(field[:, :, 1:-1, 1:-1]).permute(0, 2, 3, 1)  # (t, y, x, 2)
    error = (model - true).pow(2).sum(-1).mean().sqrt()
    assert error < 0.5, float(error)


def test_motioncorr_with_patches_writes_the_local_model():
    """--patch_x/--patch_y: rlnMotionModelVersion 1 and data_local_motion_model (36
    coefficients, RELION's order) in every motion STAR; EVN + ODD is still the sum."""
    _simulated_project("--movie-local", "2", "--tilt-range", "6")  # 3 tilts
    argv = ["motioncorr", "--i", "Import/job001/tilt_series.star", "--gain_ref", "gain.mrc",
            "--gain_rot", "1", "--gain_flip", "2", "--patch_x", "2", "--patch_y", "2",
            "--even_odd_split"]  # fmt: skip
    assert cli.run_cli(argv) == 0
    tilts = TomogramSet.read("MotionCorr/job002/corrected_tilt_series.star")["TS_01"].tilts
    for _, row in tilts.iterrows():
        blocks = read_star(row["rlnMicrographMetadata"])
        assert blocks["general"]["rlnMotionModelVersion"] == 1
        model = blocks["local_motion_model"]
        assert model["rlnMotionModelCoeffsIdx"].tolist() == list(range(36))
        assert np.isfinite(model["rlnMotionModelCoeff"]).all()
        total, _ = read_mrc(row["rlnMicrographName"])
        even, _ = read_mrc(row["rlnMicrographNameEven"])
        odd, _ = read_mrc(row["rlnMicrographNameOdd"])
        torch.testing.assert_close(even + odd, total, atol=1e-2, rtol=1e-4)


def test_dose_weighting_keeps_the_mean_and_the_noise_power():
    """--dose_weighting: the weighted sum of a movie of pure counting noise has the mean and,
    at every frequency band, the noise power of the plain sum (the weights are scaled by
    sqrt(t / Σw²)); a specimen's lowest frequencies (weights ~1) are the plain sum's."""
    from subtomo.io.movies import read_movie_header, write_movie
    from subtomo.jobs.motioncorr import MotionCorrParams, correct_movie

    rng = np.random.default_rng(4)
    for contrast in (0.0, 0.3):
        movie = simulate_movie(
            specimen_texture((128, 128), 1.0, rng, resolution=3.0), pixel_size=1.0, dose=40.0,
            n_frames=8, shifts=np.zeros((8, 2)), contrast=contrast, rng=rng,
        )  # fmt: skip
        write_movie("m.mrc", movie.frames.numpy(), 1.0)
        header = read_movie_header("m.mrc")
        sums = [
            correct_movie(
                header, None, MotionCorrParams(input_star="-", dose_weighting=weighted), 1.0,
                5.0, torch.device("cpu"),
            ).total
            for weighted in (False, True)
        ]  # fmt: skip
        plain, weighted = (torch.fft.rfft2(image).abs() for image in sums)
        assert float(weighted[0, 0]) == pytest.approx(float(plain[0, 0]), rel=1e-5)
        if contrast == 0:
            for band in (slice(1, 20), slice(20, 45), slice(45, 65)):
                ratio = weighted[:, band].pow(2).sum() / plain[:, band].pow(2).sum()
                assert 0.85 < float(ratio) < 1.15, (band, float(ratio))
        else:
            low = weighted[:2, :2].sum() / plain[:2, :2].sum()
            assert float(low) == pytest.approx(1.0, abs=0.02)


def test_reused_buffers_grow_and_are_kept():
    """The workspace hands back its tensor (or its leading part) while it is large enough
    and of the same kind, and replaces it otherwise."""
    from subtomo.jobs.motioncorr import _reused

    cpu = torch.device("cpu")
    space: dict[str, torch.Tensor] = {}
    a = _reused(space, "s", (4, 8, 5), torch.complex64, cpu)
    b = _reused(space, "s", (3, 8, 5), torch.complex64, cpu)
    assert b.shape == (3, 8, 5) and b.data_ptr() == a.data_ptr()
    c = _reused(space, "s", (6, 8, 5), torch.complex64, cpu)
    assert c.shape == (6, 8, 5) and space["s"].data_ptr() == c.data_ptr()
    d = _reused(space, "s", (2, 8, 6), torch.complex64, cpu)
    assert d.shape == (2, 8, 6) and space["s"].shape == (2, 8, 6)
    assert _reused(None, "s", (1, 2), torch.float32, cpu).shape == (1, 2)
