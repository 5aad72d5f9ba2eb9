"""CTF refinement (subtomo.tomorefine, ``subtomo ctf-refine``) against simulated truth.

One tiny noise-free data set (12 ribosomes, 11 tilts, box 64 at 5 Å/px, 3 µm) with per-tilt
defocus errors (σ 500 Å), per-particle defocus errors (σ 300 Å) and ice (κ 0.7, normal 10°):
its stacks are extracted with the true CTF (``ext_true``: the data the model must
predict exactly; ``ext_true_pre`` windowed before the CTF, ``--circle_precrop
--no_circle_crop``) and as a user would have them, with the nominal tomograms and no
per-particle defocus (``ext``).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import subtomo
from conftest import run_subtomo
from subtomo.data import DEFOCUS_ESTIMATE, DEFOCUS_OFFSET, ParticleSet, TomogramSet
from subtomo.errors import InputError
from subtomo.io import read_mrc, write_mrc
from subtomo.jobs.ctf_refine import CtfRefineParams, stack_crop
from subtomo.jobs.ctf_refine import run as run_ctf_refine
from subtomo.ml.loader import ParticleState, StackLoader
from subtomo.tomorefine import TiltPredictor, fsc_weights


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ctf")
    cwd = Path.cwd()
    try:
        os.chdir(root)
        run_subtomo(["simulate", "--out", ".", "--particles", "12", "--tilt-step", "12",
                     "--box", "64", "--pixel-size", "5", "--tomogram-size", "448,448,96",
                     "--defocus-error", "500", "--particle-defocus-error", "300",
                     "--ice-kappa", "0.7", "--ice-normal", "10", "--seed", "3"])  # fmt: skip
        run_subtomo(["extract", "--p", "particles.star", "--t", "true_alignment.star",
                     "--box", "64", "--float32", "--o", "ext_true"])  # fmt: skip
        run_subtomo(["extract", "--p", "particles.star", "--t", "true_alignment.star",
                     "--box", "64", "--float32", "--circle_precrop", "--no_circle_crop",
                     "--o", "ext_true_pre"])  # fmt: skip
        picked = ParticleSet.read("particles.star")
        picked.particles = picked.particles.drop(columns=[DEFOCUS_OFFSET])
        picked.write("particles_nominal.star")
        run_subtomo(["extract", "--p", "particles_nominal.star", "--t", "tomograms.star",
                     "--box", "64", "--float32", "--o", "ext"])  # fmt: skip
        run_subtomo(["mask", "--i", "truth.mrc", "--lowpass", "20", "--ini_threshold", "2",
                     "--extend_inimask", "3", "--width_soft_edge", "5", "--o", "mask"])  # fmt: skip
    finally:
        os.chdir(cwd)
    return root


def _correlation(predictor: TiltPredictor, state: ParticleState, low: int = 0) -> float:
    """Correlation of the data with ``A·CTF·P`` over all patches at shells >= ``low``
    (and checks the half sets)."""
    num = den_y = den_m = 0.0
    for patches in predictor.batches(state):
        keep = patches.points.shell >= low
        model = (patches.applied * patches.ctf * patches.predicted)[..., keep]
        y = patches.observed[..., keep]
        num += float((y.conj() * model).real.sum())
        den_y += float(y.abs().square().sum())
        den_m += float(model.abs().square().sum())
        subset = predictor.loader.particles.random_subset()[patches.index.numpy()]
        assert patches.half.tolist() == (subset - 1).tolist()
    return num / (den_y * den_m) ** 0.5


def test_prediction_matches_noise_free_data(project: Path, device: torch.device) -> None:
    """Stacks made with the true CTF (per-tilt and per-particle defocus, ice scale) are
    ``A·CTF·P`` at the true poses: correlation > 0.95 (neighbours and the circle crop keep it
    below 1); at poses turned by 10° about z it falls below 0.8."""
    tomograms = TomogramSet.read(project / "true_alignment.star")
    particles = ParticleSet.read(project / "ext_true/particles.star", tomograms)
    loader = StackLoader(particles, tomograms, batch_size=5)
    truth, _ = read_mrc(project / "truth.mrc")
    halves = torch.stack([truth, truth]).float()
    _, last = fsc_weights(halves, loader.pixel_size)
    predictor = TiltPredictor(loader, halves, max_shell=last, device=device)
    state = ParticleState.from_particles(particles)
    assert _correlation(predictor, state) > 0.95
    c, s = math.cos(math.radians(10)), math.sin(math.radians(10))
    turn = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    state.rotations = state.rotations @ turn
    assert _correlation(predictor, state) < 0.8


def test_loader_honours_particle_defocus(project: Path) -> None:
    """subtomoDefocusOffsetAngst (§23) moves each particle's CTF depth by offset/(hand·px)
    in every tilt (the loader's, so Refine3D and ctf-refine see it; Extract and Reconstruct
    share ``series_geometry``)."""
    tomograms = TomogramSet.read(project / "true_alignment.star")
    particles = ParticleSet.read(project / "ext_true/particles.star", tomograms)
    without = ParticleSet.read(project / "ext_true/particles.star", tomograms)
    without.particles = without.particles.drop(columns=[DEFOCUS_OFFSET])
    a, b = StackLoader(particles, tomograms), StackLoader(without, tomograms)
    offsets = particles.defocus_offsets()
    assert float(offsets.abs().max()) > 100
    series = tomograms["TS_01"]
    change = (a.depth - b.depth) * series.hand * series.defocus_slope * series.pixel_size
    expected = offsets[:, None].expand_as(change)
    assert torch.allclose(change[a.visible], expected[a.visible], atol=1e-6)


def _mean_defocus(path: Path) -> np.ndarray:
    series = TomogramSet.read(path)["TS_01"]
    return (series.defocus_u + series.defocus_v) / 2


def test_ctf_refine_recovers_defocus_scale_and_particle_defocus(project: Path) -> None:
    """The job against the true map (both halves) on the nominal stacks: the per-tilt
    defocus error falls from ~500 to < 60 Å RMS (38 measured; 73 with the points weighted by
    A² instead of the likelihood's 1/A²), the fitted scales follow the true Beer–Lambert curve
    (κ 0.7) to 2% up to the grey scale a (0.8% measured), the per-particle defocus error falls
    by > 70% (171 -> 23 Å measured; noise-free, 11 tilts);
    ``--continue`` redoes nothing and writes the same tomograms."""
    os.chdir(project)
    out = run_ctf_refine(CtfRefineParams(
        ios="ext/optimisation_set.star", ref1="truth.mrc", ref2="truth.mrc",
        mask="mask/mask.mrc", per_particle_defocus=True, output_dir="CtfRefine/job001",
    ))  # fmt: skip
    assert "CtfRefine/job001/tomograms.star" in out
    truth = _mean_defocus(project / "true_alignment.star")
    before = np.sqrt(np.mean((_mean_defocus(project / "tomograms.star") - truth) ** 2))
    after = np.sqrt(
        np.mean((_mean_defocus(project / "CtfRefine/job001/tomograms.star") - truth) ** 2)
    )
    assert before > 350 and after < 60, (before, after)

    series = TomogramSet.read(project / "CtfRefine/job001/tomograms.star")["TS_01"]
    true_scale = TomogramSet.read(project / "true_alignment.star")["TS_01"].ctf_scale
    ratio = series.ctf_scale / true_scale  # the amplitude a is the maps' grey scale
    assert np.ptp(ratio) < 0.02 * ratio.mean()

    true_offsets = ParticleSet.read(project / "particles.star").defocus_offsets().numpy()
    fitted = ParticleSet.read(project / "CtfRefine/job001/particles.star").defocus_offsets().numpy()
    rms_before = np.sqrt(np.mean(true_offsets**2))
    rms_after = np.sqrt(np.mean((fitted - true_offsets) ** 2))
    assert rms_after < 0.3 * rms_before, (rms_before, rms_after)

    # the CTF estimate is kept where the prior of a later run is centred
    written = TomogramSet.read(project / "CtfRefine/job001/tomograms.star")["TS_01"]
    assert DEFOCUS_ESTIMATE in written.tilts.columns
    nominal = _mean_defocus(project / "tomograms.star")
    np.testing.assert_allclose(written.defocus_estimate, nominal, atol=0.01)
    refined = (written.defocus_u + written.defocus_v) / 2
    assert np.abs(written.defocus_estimate - refined).max() > 100

    # the report gives the κ² of both fits
    report = (project / "CtfRefine/job001/report.html").read_text()
    assert "likelihood widened" in report and "particles 1." in report

    first = TomogramSet.read(project / "CtfRefine/job001/tomograms.star")["TS_01"].tilts
    run_ctf_refine(CtfRefineParams(continue_from="CtfRefine/job001"))
    again = TomogramSet.read(project / "CtfRefine/job001/tomograms.star")["TS_01"].tilts
    assert again.equals(first)


def test_particle_defocus_prior_is_on_the_total_offset() -> None:
    """Where the data say nothing (zero patches), the per-particle fit returns the change
    that takes each particle's current offset back to the prior's centre, 0 Å in total
    (with the prior on the change alone it returned 0 for every particle, so repeated runs
    let the offsets wander)."""
    from types import SimpleNamespace

    from subtomo.tomorefine.ctf import (
        particle_defocus_grid,
        particle_defocus_modes,
        particle_defocus_profiles,
    )

    b, f, k = 3, 2, 5
    zero = torch.zeros(b, f, k, dtype=torch.complex64)
    patches = SimpleNamespace(
        applied=torch.ones(b, f, k), quadrature=zero + 1, observed=zero, predicted=zero,
        tomo_names=np.array(["TS_01"] * b), defocus_phase=torch.full((k,), -1e-4),
    )  # fmt: skip
    weights = {"TS_01": torch.ones(k)}
    current = torch.tensor([0.0, 120.0, -250.0], dtype=torch.float64)
    grid = particle_defocus_grid(300.0)
    nll = particle_defocus_profiles(patches, weights, grid)
    change, _ = particle_defocus_modes(grid, nll, 300.0, current=current)
    assert torch.allclose(change, -current, atol=1.0), change
    unchanged, _ = particle_defocus_modes(grid, nll, 300.0)
    assert torch.allclose(unchanged, torch.zeros(b, dtype=unchanged.dtype), atol=1.0)


def test_tilt_defocus_prior_is_centred_on_the_estimate() -> None:
    """Where the data say nothing (zero sums), each tilt's fitted change is the prior's
    centre, the change back to its CTF estimate (the prior's centre used to be the current
    defocus, so that every further run of ctf-refine let the defoci wander)."""
    from subtomo.tomorefine.ctf import TiltStatistics, fit_tilt_defocus

    t, k = 3, 6
    stats = TiltStatistics.zeros(t, k, 4, "cpu")
    freq = torch.randn(k, 2)
    phase = torch.full((k,), -1e-4)
    centre = torch.tensor([0.0, 310.0, -180.0], dtype=torch.float64)
    fit = fit_tilt_defocus(stats, torch.ones(k), freq, phase, sigma_angst=500.0,
                           prior_centre=centre, astigmatism="none")  # fmt: skip
    assert torch.allclose(fit.delta, centre, atol=1.0), fit.delta
    fit = fit_tilt_defocus(stats, torch.ones(k), freq, phase, sigma_angst=500.0,
                           astigmatism="none")  # fmt: skip
    assert torch.allclose(fit.delta, torch.zeros(t, dtype=fit.delta.dtype), atol=1.0)


@pytest.mark.parametrize("true_k2", [1.0, 4.0])
def test_tempered_likelihood_recovers_the_scatter(true_k2: float) -> None:
    """Tilts whose fits scatter ``true_k2`` times more than their likelihood says: the
    estimated κ² is within 25% of it, and the tempered posterior modes are closer to the
    truth than the untempered ones when ``true_k2`` is 4 (and within 1% when it is 1)."""
    from subtomo.tomorefine.ctf import temper_likelihood

    g = torch.Generator().manual_seed(5)
    t, prior = 400, 500.0
    sigma_like = 100.0 * torch.exp(2.0 * torch.rand(t, generator=g, dtype=torch.float64))
    truth = prior * torch.randn(t, generator=g, dtype=torch.float64)
    ml = truth + true_k2**0.5 * sigma_like * torch.randn(t, generator=g, dtype=torch.float64)
    info = 1 / sigma_like**2
    precision = info + 1 / prior**2
    mode, sigma = ml * info / precision, precision.rsqrt()  # what the fit reports
    tempered, _, k2 = temper_likelihood(mode, sigma, torch.zeros(t), prior)
    assert abs(k2 / true_k2 - 1) < 0.25, k2

    def rms(x: torch.Tensor) -> float:
        return float(x.square().mean().sqrt())

    before, after = rms(mode - truth), rms(tempered - truth)
    assert (after < 0.95 * before) if true_k2 > 1 else (after < 1.01 * before), (before, after)


def test_tempering_needs_evidence() -> None:
    """41 tilts whose fits scatter exactly as their likelihood says, with likelihoods much
    sharper than the prior and true changes spread 1.15x the prior's σ: the marginal
    likelihood barely depends on κ² there, so the likelihood is not widened (without the
    likelihood-ratio test the spread was read as κ² > 1 and the modes shrunk)."""
    from subtomo.tomorefine.ctf import temper_likelihood

    t, prior = 41, 500.0
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        sigma_like = 60.0 * torch.exp(torch.rand(t, generator=g, dtype=torch.float64))
        truth = 1.15 * prior * torch.randn(t, generator=g, dtype=torch.float64)
        ml = truth + sigma_like * torch.randn(t, generator=g, dtype=torch.float64)
        precision = 1 / sigma_like**2 + 1 / prior**2
        mode, sigma = ml / sigma_like**2 / precision, precision.rsqrt()
        tempered, sd, k2 = temper_likelihood(mode, sigma, torch.zeros(t), prior)
        assert k2 == 1.0, (seed, k2)
        assert torch.allclose(tempered, mode) and torch.allclose(sd, sigma)


def test_particle_tempering_after_the_bias_correction() -> None:
    """Gaussian per-particle profiles whose modes are all shifted by a bias that the fit to
    simulated data measures (its profiles centred on the bias): the likelihood is not
    widened (the fits scatter as it says once the bias is removed) and the changes are the
    unbiased Gaussian posterior modes. Tempered before the correction, the bias was read as
    scatter (κ² > 1) and the changes shrunk."""
    from subtomo.tomorefine.ctf import particle_defocus_grid, tempered_particle_changes

    g = torch.Generator().manual_seed(11)
    b, prior, bias = 300, 300.0, -270.0
    sigma_like = 120.0 * torch.exp(0.5 * torch.rand(b, generator=g, dtype=torch.float64))
    truth = prior * torch.randn(b, generator=g, dtype=torch.float64)
    ml = truth + bias + sigma_like * torch.randn(b, generator=g, dtype=torch.float64)
    grid = particle_defocus_grid(prior)
    nll = (grid[None] - ml[:, None]).square() / (2 * sigma_like[:, None] ** 2)
    sim = (grid[None] - bias).square().expand(b, -1) / (2 * sigma_like[:, None] ** 2)
    delta, k2 = tempered_particle_changes(grid, nll, prior, torch.zeros(b), sim)
    assert k2 == 1.0, k2
    precision = 1 / sigma_like**2 + 1 / prior**2
    expected = (ml - bias) / sigma_like**2 / precision
    assert (delta - expected).abs().max() < 3.0, (delta - expected).abs().max()


def test_tempered_particle_modes() -> None:
    """Per-particle profiles that are Gaussian in the change: the grid modes and σ are the
    Gaussian posterior's (prior on the total offset, likelihood over κ²); with fits that
    scatter 3x their likelihood's variance, the κ² that the particles' own modes give is
    within 25% of 3, and the modes at that κ² are closer to the truth."""
    from subtomo.tomorefine.ctf import (
        particle_defocus_grid,
        particle_defocus_modes,
        temper_likelihood,
    )

    g = torch.Generator().manual_seed(7)
    b, prior, true_k2 = 400, 300.0, 3.0
    sigma_like = 60.0 * torch.exp(1.5 * torch.rand(b, generator=g, dtype=torch.float64))
    current = 150.0 * torch.randn(b, generator=g, dtype=torch.float64)
    total = prior * torch.randn(b, generator=g, dtype=torch.float64)  # the true offsets
    ml = total - current + true_k2**0.5 * sigma_like * torch.randn(b, generator=g).double()
    grid = particle_defocus_grid(prior)
    nll = (grid[None] - ml[:, None]).square() / (2 * sigma_like[:, None] ** 2)
    for k2 in (1.0, 2.5):
        precision = 1 / (k2 * sigma_like**2) + 1 / prior**2
        expected = (ml / (k2 * sigma_like**2) - current / prior**2) / precision
        mode, sd = particle_defocus_modes(grid, nll, prior, current=current, kappa2=k2)
        assert torch.allclose(mode, expected, atol=2.0), (mode - expected).abs().max()
        assert torch.allclose(sd, precision.rsqrt(), rtol=0.02)
    mode, sd = particle_defocus_modes(grid, nll, prior, current=current)
    _, _, k2 = temper_likelihood(mode, sd, -current, prior)
    assert abs(k2 / true_k2 - 1) < 0.25, k2
    tempered, _ = particle_defocus_modes(grid, nll, prior, current=current, kappa2=k2)

    def rms(x: torch.Tensor) -> float:
        return float(x.square().mean().sqrt())

    before, after = rms(current + mode - total), rms(current + tempered - total)
    assert after < 0.95 * before, (before, after)


def test_ctf_refine_refuses_maps_of_another_box(project: Path, tmp_path: Path) -> None:
    """Half maps not at the stacks' box, or no mask: one InputError each, no job dir."""
    os.chdir(project)
    small = str(tmp_path / "small.mrc")
    write_mrc(small, torch.rand(32, 32, 32), 5.0)
    with pytest.raises(InputError, match="rlnImageSize"):
        run_ctf_refine(CtfRefineParams(
            ios="ext/optimisation_set.star", ref1=small, ref2=small, mask=small,
            output_dir="CtfRefine/bad",
        ))  # fmt: skip
    with pytest.raises(InputError, match="mask"):
        run_ctf_refine(CtfRefineParams(
            ios="ext/optimisation_set.star", ref1="truth.mrc", ref2="truth.mrc",
            output_dir="CtfRefine/bad",
        ))  # fmt: skip
    assert not (project / "CtfRefine/bad").exists()


def test_two_ranks_give_the_same_tomograms(project: Path) -> None:
    """2 gloo ranks (torchrun) share each tilt series' particles and sum the statistics:
    the same per-tilt defocus and scale as one process (to float rounding), and the same
    per-particle defocus (each rank's likelihood profiles gathered before κ² is estimated)."""
    os.chdir(project)
    args = ["ctf-refine", "--ios", "ext/optimisation_set.star", "--ref1", "truth.mrc",
            "--ref2", "truth.mrc", "--mask", "mask/mask.mrc", "--batch", "4",
            "--no_bias_correction", "--per_particle_defocus"]  # fmt: skip
    run_subtomo([*args, "--o", "CtfRefine/one"])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(Path(subtomo.__file__).parents[1])  # this checkout's package
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         "2", "-m", "subtomo.cli", *args, "--o", "CtfRefine/two"],
        cwd=project, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    one = TomogramSet.read(project / "CtfRefine/one/tomograms.star")["TS_01"]
    two = TomogramSet.read(project / "CtfRefine/two/tomograms.star")["TS_01"]
    np.testing.assert_allclose(two.defocus_u, one.defocus_u, atol=1.0)
    np.testing.assert_allclose(two.ctf_scale, one.ctf_scale, rtol=1e-3)
    offsets = [
        ParticleSet.read(project / f"CtfRefine/{run}/particles.star").defocus_offsets()
        for run in ("one", "two")
    ]
    assert float(offsets[0].abs().max()) > 1.0  # the per-particle fit moved the particles
    np.testing.assert_allclose(offsets[1].numpy(), offsets[0].numpy(), atol=1.0)


def _simulation_error(project: Path, stacks: str, **crop: bool) -> float:
    """Relative residual ``Σ|Y − Y_sim|² / Σ|Y|²`` of noise-free stacks ``stacks`` (made
    with the true CTF) against :meth:`TiltPredictor.batches` ``simulate`` (the true map, the
    cropping ``crop`` of the predictor)."""
    tomograms = TomogramSet.read(project / "true_alignment.star")
    particles = ParticleSet.read(project / stacks / "particles.star", tomograms)
    loader = StackLoader(particles, tomograms, batch_size=6)
    truth, _ = read_mrc(project / "truth.mrc")
    halves = torch.stack([truth, truth]).float()
    predictor = TiltPredictor(loader, halves, max_shell=32, **crop)
    state = ParticleState.from_particles(particles)
    num = den = 0.0
    for data, sim in zip(predictor.batches(state), predictor.batches(state, simulate=True),
                         strict=True):  # fmt: skip
        num += float((data.observed - sim.observed).abs().square().sum())
        den += float(data.observed.abs().square().sum())
    return num / den


def test_stack_crop_from_the_extract_job(project: Path) -> None:
    """ctf-refine reads how the stacks were cropped from the Extract job.star above them
    (RELION's default, after the CTF, when there is none), and its simulation of the data
    (the bias correction, §23) crops the same way: on noise-free stacks windowed before the
    CTF its residual is < 2% (0.95% measured; the neighbours are not in the model) and
    < 0.9 times what it is if the simulation assumes RELION's crop after the CTF (1.16%:
    the stacks' CTF-delocalised signal outside the circle is then wrongly removed), and vice
    versa on RELION's stacks (0.98% against 1.20%)."""
    os.chdir(project)
    tomograms = TomogramSet.read("true_alignment.star")
    assert stack_crop(ParticleSet.read("ext_true/particles.star", tomograms)) == "post"
    pre_parts = ParticleSet.read("ext_true_pre/particles.star", tomograms)
    assert stack_crop(pre_parts) == "pre"
    pre_parts.particles["rlnImageName"] = "elsewhere/" + pre_parts.particles["rlnImageName"]
    assert stack_crop(pre_parts) == "post"  # no job.star found: RELION's default
    pre = _simulation_error(project, "ext_true_pre", circle_cropped=False, precropped=True)
    pre_wrong = _simulation_error(project, "ext_true_pre", circle_cropped=True)
    post = _simulation_error(project, "ext_true", circle_cropped=True)
    post_wrong = _simulation_error(project, "ext_true", circle_cropped=False, precropped=True)
    assert pre < 0.02 and post < 0.02, (pre, post)
    assert pre < 0.9 * pre_wrong and post < 0.9 * post_wrong, (pre, pre_wrong, post, post_wrong)


def test_reference_gain_keeps_the_mean_and_fits_the_differences(project: Path) -> None:
    """A reference with a smooth radial profile (the true map low-passed by
    ``exp(−(|k|/20 shells)²)``, as a map from the data is: §23) and ``--kmin`` 100 Å, where
    the first CTF lobe's shape carries the defocus: without the reference's gain the fit
    moves every tilt's defocus by a common offset (+236 Å measured, RMS 283 Å); with it the
    series keeps its mean defocus (a common change cannot be told from the gain) and the
    differences between tilts are fitted: their RMS error falls from the nominal's (500 Å)
    to < 70 Å (47 measured)."""
    os.chdir(project)
    truth, pixel = read_mrc("truth.mrc")
    n = truth.shape[0]
    k = torch.fft.fftfreq(n) * n
    shell = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2
                       + (torch.fft.rfftfreq(n) * n)[None, None, :] ** 2)  # fmt: skip
    spectrum = torch.fft.rfftn(torch.fft.ifftshift(truth.double()))
    spectrum *= torch.exp(-((shell / 20) ** 2))
    filtered = torch.fft.fftshift(torch.fft.irfftn(spectrum, s=truth.shape)).float()
    write_mrc("truth_lowpass.mrc", filtered, pixel)
    true_defocus = _mean_defocus(project / "true_alignment.star")
    nominal = _mean_defocus(project / "tomograms.star")
    found = {}
    for fit_gain in (False, True):
        out = f"CtfRefine/gain_{int(fit_gain)}"
        run_ctf_refine(CtfRefineParams(
            ios="ext/optimisation_set.star", ref1="truth_lowpass.mrc", ref2="truth_lowpass.mrc",
            mask="mask/mask.mrc", kmin=100.0, reference_spectrum=fit_gain, output_dir=out,
        ))  # fmt: skip
        found[fit_gain] = _mean_defocus(project / out / "tomograms.star")
    assert (found[False] - true_defocus).mean() > 150, found[False] - true_defocus
    assert abs((found[True] - nominal).mean()) < 1.0, found[True] - nominal

    def spread(errors: np.ndarray) -> float:
        return float(np.sqrt(np.mean((errors - errors.mean()) ** 2)))

    before, after = spread(nominal - true_defocus), spread(found[True] - true_defocus)
    assert before > 300 and after < 70, (before, after)


def test_ctf_refine_fits_aberrations(tmp_path: Path) -> None:
    """Noise-free images with tetrafoil (even Z_4^4) and trefoil (odd Z_3^-3, Z_3^3), ~0.8 rad
    at Nyquist (5 Å/px), extracted as a user would before knowing them (no aberration
    columns): ``--do_even_aberrations --do_odd_aberrations`` against the true map recovers
    each within 20% (measured: 6916 for 8000, 599 / 792 for 600 / 800), and the whole fitted
    phase is within 0.15 rad of the true one at every point up to Nyquist (the other terms'
    constant parts cancel: Z_0^0 −0.28, Z_4^0 +0.36 rad); ``--continue`` gives them again
    from the checkpoint."""
    from subtomo.ctf.aberrations import aberration_phase

    even = [0, 0, 0, 0, 0, 0, 0, 0, 8000.0]
    odd = [0, 0, 600.0, 0, 0, 800.0]
    os.chdir(tmp_path)
    run_subtomo(["simulate", "--out", ".", "--particles", "12", "--tilt-step", "12",
                 "--box", "64", "--pixel-size", "5", "--tomogram-size", "448,448,96",
                 "--even-zernike", str(even).replace(" ", ""),
                 "--odd-zernike", str(odd).replace(" ", ""), "--seed", "3"])  # fmt: skip
    true = ParticleSet.read("particles.star")
    assert true.aberrations("TS_01") == (tuple(even), tuple(odd))
    true.optics = true.optics.drop(columns=["rlnEvenZernike", "rlnOddZernike"])
    true.write("particles_plain.star")
    run_subtomo(["extract", "--p", "particles_plain.star", "--t", "tomograms.star",
                 "--box", "64", "--float32", "--o", "ext"])  # fmt: skip
    run_subtomo(["mask", "--i", "truth.mrc", "--lowpass", "20", "--ini_threshold", "2",
                 "--extend_inimask", "3", "--width_soft_edge", "5", "--o", "mask"])  # fmt: skip
    run_ctf_refine(CtfRefineParams(
        ios="ext/optimisation_set.star", ref1="truth.mrc", ref2="truth.mrc",
        mask="mask/mask.mrc", do_even_aberrations=True, do_odd_aberrations=True,
        output_dir="CtfRefine/job001",
    ))  # fmt: skip
    fitted = ParticleSet.read("CtfRefine/job001/particles.star").aberrations("TS_01")
    assert len(fitted[0]) == 9 and len(fitted[1]) == 6
    k = torch.fft.rfftfreq(64, 5.0, dtype=torch.float64)
    ky = torch.fft.fftfreq(64, 5.0, dtype=torch.float64)
    kx, ky = k[None].expand(64, -1), ky[:, None].expand(-1, 33)
    inside = (kx**2 + ky**2).sqrt() <= 0.1
    for got, want, parity in ((fitted[0], even, "even"), (fitted[1], odd, "odd")):
        for j, value in enumerate(want):
            if value:
                assert abs(got[j] / value - 1) < 0.2, (parity, j, got)
        error = [g - w for g, w in zip(got, want, strict=True)]
        residual = aberration_phase(error, parity, kx, ky)[inside]
        assert residual.abs().max() < 0.15, (parity, got)
    assert Path("CtfRefine/job001/aberrations.png").is_file()
    assert "optics group 1 rlnOddZernike" in Path("CtfRefine/job001/report.html").read_text()
    # --continue: the sums are in the checkpoint, the same coefficients come out
    run_ctf_refine(CtfRefineParams(continue_from="CtfRefine/job001"))
    assert ParticleSet.read("CtfRefine/job001/particles.star").aberrations("TS_01") == fitted
