"""``subtomo class3d`` end to end on simulated projects: the stack loader, classification
without alignment, local alignment, RELION's output files, --continue and bad input."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from typer.testing import CliRunner

from subtomo.cli.main import app
from subtomo.data import ParticleSet, read_particle_inputs
from subtomo.errors import InputError
from subtomo.fourier import fsc_maps
from subtomo.geometry import euler_to_matrix, rotation_angle_deg
from subtomo.io import read_mrc, write_mrc
from subtomo.jobs.class3d import Class3DParams, run
from subtomo.jobs.extract import ExtractParams
from subtomo.jobs.extract import run as run_extract
from subtomo.masks import soft_sphere
from subtomo.ml import EngineParams, MLModel, Sampling, expectation_pass, initial_sigma2
from subtomo.ml.batch import fourier_points
from subtomo.ml.engine import maximise, self_term_scores
from subtomo.ml.estep import score_batch, slice_matrices
from subtomo.ml.images import mask_images
from subtomo.ml.loader import ParticleState, StackLoader
from subtomo.ml.projector import Projector
from subtomo.ml.sampling import pose_grid
from subtomo.ml.seeding import pca_classes
from subtomo.ml.starfiles import load_checkpoint

PX = 20.0
BOX = 24
DEMO = Path(__file__).resolve().parents[1] / "src" / "subtomo" / "demo_data"


def _simulate(root: Path, *args: str) -> None:
    result = CliRunner().invoke(
        app,
        [
            "simulate", "--out", str(root), "--preset", "tiny", "--pixel-size", str(PX),
            "--tilt-step", "10", "--noise", "gaussian", "--snr", "0.1", *args,
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output


def _extract(root: Path, particles: str, box: int) -> None:
    with contextlib.chdir(root):
        run_extract(
            ExtractParams(
                particles=particles, tomograms="tomograms.star", box=box, float16=False,
                output_dir="ext", device="cpu",
            )
        )  # fmt: skip


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> Path:
    """60 particles, 50/50 70S and 50S ribosomes (true poses), 13 tilts, box 24 at 20 Å,
    SNR 0.1, extracted as 2D stacks; ``mix.mrc`` is the average of the two true maps."""
    root = tmp_path_factory.mktemp("mix") / "project"
    _simulate(
        root, "--box", str(BOX), "--particles", "60", "--tomogram-size", "256,256,64",
        "--map", str(DEMO / "ribosome70S_4v4r_5A.mrc.gz"),
        "--map", str(DEMO / "ribosome50S_4v4r_5A.mrc.gz"),
    )  # fmt: skip
    _extract(root, "particles.star", BOX)
    a, px = read_mrc(root / "truth_ribosome70S_4v4r_5A.mrc")
    b, _ = read_mrc(root / "truth_ribosome50S_4v4r_5A.mrc")
    write_mrc(root / "mix.mrc", 0.5 * (a + b), px)
    return root


def _is_50s(particles: pd.DataFrame) -> np.ndarray:
    return particles["subtomoSpecies"].str.contains("50S").to_numpy()


@pytest.fixture(scope="module")
def classification(mixture) -> Path:
    """K=2 without alignment, 5 iterations, E-step limited to 60 Å, through the CLI. Seed 2:
    with 60 particles the random initial halves of some seeds hold the two species in
    nearly equal shares, a (slowly left) fixed point of the algorithm, as in RELION."""
    with contextlib.chdir(mixture):
        result = CliRunner().invoke(
            app,
            [
                "class3d", "--ios", "ext/optimisation_set.star", "--ref", "mix.mrc", "--K", "2",
                "--iter", "5", "--skip_align", "--strict_highres_exp", "60",
                "--particle_diameter", str(0.8 * BOX * PX), "--random_seed", "2",
                "--device", "cpu", "--o", "Class3D/job010",
            ],
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    return mixture / "Class3D" / "job010"


def test_loader_batches_are_the_engines_model_of_the_stacks(mixture, monkeypatch) -> None:
    """With the two true maps as references, one E-step on the loader's batches assigns every
    particle to its true species with certainty; a wrong tilt rotation, CTF, grey scale or
    stack/tilt bookkeeping in the loader would mix them up."""
    monkeypatch.chdir(mixture)
    parts, tomos, _, _ = read_particle_inputs("ext/optimisation_set.star", None, None)
    loader = StackLoader(parts, tomos, batch_size=25)
    state = ParticleState.from_particles(parts, 2)
    refs = torch.stack(
        [read_mrc(f"truth_ribosome{s}_4v4r_5A.mrc")[0] for s in ("70S", "50S")]
    )  # fmt: skip
    model = MLModel.initial(refs, initial_sigma2(loader.batches(state), 1, BOX), PX)
    params = EngineParams(
        particle_diameter_angst=0.8 * BOX * PX, strict_highres_exp_angst=60.0,
        random_class_init=False,
    )  # fmt: skip
    _, res = expectation_pass(model, loader.batches(state), Sampling(align=False), params)
    assert torch.equal(res.index, torch.arange(len(parts)))
    assert np.array_equal(res.classes.numpy(), _is_50s(parts.particles).astype(int))
    assert float(res.pmax.min()) > 0.99


def test_warptools_stacks_read_like_relion_stacks(mixture, monkeypatch, tmp_path) -> None:
    """A stack holding every tilt (WarpTools, invisible tilts blank) gives the same batch as
    RELION's stack of the visible tilts only; the visible tilts must be picked in order."""
    monkeypatch.chdir(mixture)
    parts, tomos, _, _ = read_particle_inputs("ext/optimisation_set.star", None, None)
    sub = parts.subset([0, 1])
    table = sub.particles
    n_tilts = tomos[table["rlnTomoName"].iloc[0]].n_tilts
    visible = np.ones(n_tilts, dtype=int)
    visible[[0, 5]] = 0
    table["rlnTomoVisibleFrames"] = "[" + ",".join(map(str, visible)) + "]"
    warp, relion = table.copy(), table.copy()
    for i, name in enumerate(table["rlnImageName"]):
        stack, px = read_mrc(name)
        full = stack.clone()
        full[[0, 5]] = 0
        write_mrc(tmp_path / f"w{i}.mrcs", full, px)
        write_mrc(tmp_path / f"r{i}.mrcs", stack[torch.from_numpy(visible == 1)], px)
        warp.loc[i, "rlnImageName"] = str(tmp_path / f"w{i}.mrcs")
        relion.loc[i, "rlnImageName"] = str(tmp_path / f"r{i}.mrcs")
    batches = []
    for t in (warp, relion):
        s = ParticleSet(t, sub.optics, sub.general, path=sub.path)
        loader = StackLoader(s, tomos, batch_size=2)
        batches.append(next(loader.batches(ParticleState.from_particles(s))))
    w, r = batches
    assert w.data.shape[1] == n_tilts - 2
    assert torch.allclose(w.data, r.data, atol=1e-6) and torch.equal(w.ctf2, r.ctf2)
    # packed in tilt order: tilts 1-4, then 6-12 of the stack with every tilt visible
    full = StackLoader(parts.subset([0, 1]), tomos, batch_size=2)
    ref = next(full.batches(ParticleState.from_particles(parts.subset([0, 1]))))
    assert torch.allclose(w.data[:, :4], ref.data[:, 1:5], atol=1e-6)
    assert torch.equal(w.ctf2[:, 4:], ref.ctf2[:, 6:])
    assert torch.equal(w.tilt_rotations[:, 4:], ref.tilt_rotations[:, 6:])


def test_two_classes_separate_without_alignment(classification, mixture) -> None:
    """K=2 from one average map separates the 70S from the 50S particles (>= 95%) in 5
    iterations, and rlnClassDistribution equals the share of particles in each class."""
    data = starfile.read(classification / "run_it005_data.star")["particles"]
    truth = _is_50s(data)
    cls = data["rlnClassNumber"].to_numpy()
    agree = float(np.mean((cls == 2) == truth))
    assert max(agree, 1 - agree) >= 0.95, pd.crosstab(data["subtomoSpecies"], cls)
    model = starfile.read(classification / "run_it005_model.star")
    dist = model["model_classes"]["rlnClassDistribution"].to_numpy()
    assert dist.sum() == pytest.approx(1.0)
    assert dist == pytest.approx(np.bincount(cls, minlength=3)[1:] / len(cls), abs=0.02)


def test_outputs_carry_relions_columns(classification) -> None:
    """Every iteration's files exist with RELION's names and columns (§7.4), the changes in
    the optimiser file agree with the data files, and the report and plot are written."""
    for it in range(6):
        for suffix in ("data.star", "model.star", "optimiser.star", "sampling.star",
                       "optimisation_set.star", "class001.mrc", "class002.mrc"):  # fmt: skip
            assert (classification / f"run_it{it:03d}_{suffix}").is_file(), (it, suffix)
    model = starfile.read(classification / "run_it005_model.star")
    general = model["model_general"]
    for col in ("rlnCurrentResolution", "rlnCurrentImageSize", "rlnNrClasses",
                "rlnTau2FudgeFactor", "rlnLogLikelihood", "rlnAveragePmax",
                "rlnSigmaOffsetsAngst", "rlnPixelSize", "rlnOriginalImageSize"):  # fmt: skip
        assert col in general, col
    assert general["rlnNrClasses"] == 2 and general["rlnPixelSize"] == pytest.approx(PX)
    assert 0 < general["rlnCurrentResolution"] < 1 / (2 * PX) + 1e-9
    classes = model["model_classes"]
    assert {"rlnReferenceImage", "rlnClassDistribution", "rlnEstimatedResolution",
            "rlnAccuracyRotations"} <= set(classes.columns)  # fmt: skip
    assert Path(classes["rlnReferenceImage"].iloc[1]).name == "run_it005_class002.mrc"
    assert (classes["rlnEstimatedResolution"] >= 2 * PX).all()
    for block in ("model_class_1", "model_class_2"):
        assert {"rlnSpectralIndex", "rlnSsnrMap", "rlnReferenceTau2"} <= set(model[block])
    assert len(model["model_optics_group_1"]["rlnSigma2Noise"]) == BOX // 2 + 1
    assert model["model_groups"]["rlnGroupNrParticles"].sum() == 60
    data = starfile.read(classification / "run_it005_data.star")
    parts = data["particles"]
    for col in ("rlnClassNumber", "rlnLogLikeliContribution", "rlnMaxValueProbDistribution",
                "rlnNrOfSignificantSamples", "rlnAngleRot", "rlnOriginXAngst"):  # fmt: skip
        assert col in parts, col
    assert ((parts["rlnMaxValueProbDistribution"] > 0) & (parts["rlnMaxValueProbDistribution"]
            <= 1 + 1e-9)).all()  # fmt: skip
    assert data["general"]["rlnTomoSubTomosAre2DStacks"] == 1
    assert "rlnImagePixelSize" in data["optics"]
    before = starfile.read(classification / "run_it004_data.star")["particles"]
    changed = float(np.mean(before["rlnClassNumber"] != parts["rlnClassNumber"]))
    opt = starfile.read(classification / "run_it005_optimiser.star")
    assert opt["rlnChangesOptimalClasses"] == pytest.approx(changed)
    assert opt["rlnCurrentIteration"] == 5
    assert Path(opt["rlnModelStarFile"]).name == "run_it005_model.star"
    assert Path(opt["rlnExperimentalDataStarFile"]).name == "run_it005_data.star"
    ios = starfile.read(classification / "run_it005_optimisation_set.star")
    assert Path(ios["rlnTomoParticlesFile"]).name == "run_it005_data.star"
    assert (classification / "report.html").is_file()
    assert (classification / "class_progress.png").stat().st_size > 1000


def test_continue_reproduces_the_uninterrupted_run(classification, mixture, monkeypatch):
    """--continue <job directory> on a copy of the job cut short while writing iteration 4
    (all its files but the optimiser file, which is written last) resumes after iteration 3,
    and gives iterations 4 and 5 bit-identical to the uninterrupted run: maps, spectra, poses
    and assignments. Picking the half-written iteration 4 would skip its redo."""
    monkeypatch.chdir(mixture)
    copy = mixture / "Class3D" / "job011"
    shutil.copytree(classification, copy)
    for f in [*copy.glob("run_it005_*"), copy / "run_it004_optimiser.star"]:
        f.unlink()
    (copy / "run_it004_checkpoint.pt").write_bytes(b"half-written")
    run(Class3DParams(continue_from=str(copy), iter=5, device="cpu"))
    for name in ("run_it005_class001.mrc", "run_it005_class002.mrc"):
        assert torch.equal(read_mrc(copy / name)[0], read_mrc(classification / name)[0])
    a = load_checkpoint(copy / "run_it005_checkpoint.pt")
    b = load_checkpoint(classification / "run_it005_checkpoint.pt")
    for group in ("model", "particles"):
        for key, value in a[group].items():
            other = b[group][key]
            same = torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
            assert same, (group, key)


def test_local_refinement_improves_poses(tmp_path_factory, monkeypatch) -> None:
    """K=1 with local searches from poses perturbed by 8 deg and 2 px: after 2 iterations the
    median angular error (full rotation matrices) is below 4 deg and the class map's FSC to
    the truth beats that of the map at the perturbed poses (no alignment)."""
    root = tmp_path_factory.mktemp("align") / "project"
    _simulate(
        root, "--box", "32", "--particles", "16", "--tomogram-size", "384,384,64",
        "--pose-error-deg", "8", "--shift-error-px", "2",
    )  # fmt: skip
    _extract(root, "particles_picked.star", 32)
    monkeypatch.chdir(root)
    common = dict(
        ios="ext/optimisation_set.star", ref=("truth.mrc",), ini_high=60.0,
        particle_diameter=0.8 * 32 * PX, device="cpu",
    )  # fmt: skip
    run(Class3DParams(**common, iter=2, healpix_order=4, sigma_ang=3.0, offset_range=3,
                      offset_step=1, output_dir="aligned"))  # fmt: skip
    run(Class3DParams(**common, iter=1, skip_align=True, output_dir="fixed"))
    truth = ParticleSet.read("particles.star").particle_matrices()
    angles = starfile.read("aligned/run_it002_data.star")["particles"]
    est = euler_to_matrix(*(torch.tensor(angles[f"rlnAngle{a}"].to_numpy())
                            for a in ("Rot", "Tilt", "Psi")))  # fmt: skip
    err = rotation_angle_deg(est, truth)
    assert float(err.median()) < 4.0, err
    true_map, _ = read_mrc("truth.mrc")
    fsc_aligned = fsc_maps(read_mrc("aligned/run_it002_class001.mrc")[0], true_map)[3:12]
    fsc_fixed = fsc_maps(read_mrc("fixed/run_it001_class001.mrc")[0], true_map)[3:12]
    assert float(fsc_aligned.mean()) > float(fsc_fixed.mean()) + 0.05, (fsc_aligned, fsc_fixed)


def _error(mixture: Path, **changes) -> InputError:
    params = dict(ios="ext/optimisation_set.star", ref=("mix.mrc",), iter=1, skip_align=True,
                  device="cpu", output_dir="bad")  # fmt: skip
    with pytest.raises(InputError) as exc:
        run(Class3DParams(**{**params, **changes}))
    return exc.value


def test_bad_inputs_give_clear_errors(mixture, classification, monkeypatch, tmp_path) -> None:
    """A reference with another pixel size or box, particles from a tomogram not in the set,
    and a --continue without its checkpoint each stop with an InputError naming the file."""
    monkeypatch.chdir(mixture)
    vol, px = read_mrc("mix.mrc")
    write_mrc(tmp_path / "px.mrc", vol, px * 1.01)
    err = _error(mixture, ref=(str(tmp_path / "px.mrc"),))
    assert "px.mrc" in str(err) and "pixel size" in str(err)
    write_mrc(tmp_path / "box.mrc", vol[2:-2, 2:-2, 2:-2], px)
    err = _error(mixture, ref=(str(tmp_path / "box.mrc"),))
    assert "box.mrc" in str(err) and "rlnImageSize" in str(err)
    parts = ParticleSet.read("ext/particles.star")
    parts.particles.loc[3, "rlnTomoName"] = "TS_99"
    parts.write(tmp_path / "other.star")
    err = _error(mixture, ios=None, particles=str(tmp_path / "other.star"),
                 tomograms="tomograms.star")  # fmt: skip
    assert "TS_99" in str(err) and "row 4" in str(err) and "other.star" in str(err)
    shutil.copy("Class3D/job010/run_it001_optimiser.star", tmp_path / "run_it001_optimiser.star")
    err = _error(mixture, continue_from=str(tmp_path / "run_it001_optimiser.star"))
    assert "checkpoint" in str(err)


def _mixture_model(mixture: Path, batch_size: int):
    parts, tomos, _, _ = read_particle_inputs("ext/optimisation_set.star", None, None)
    loader = StackLoader(parts, tomos, batch_size=batch_size)
    state = ParticleState.from_particles(parts, 2)
    sigma2 = initial_sigma2(loader.batches(state), 1, BOX)
    mix = read_mrc(mixture / "mix.mrc")[0]
    return parts, loader, state, sigma2, mix


def test_pca_classes_split_the_species(mixture, monkeypatch) -> None:
    """The first iteration's classes from the principal component of the particles' 60 Å
    residuals against the average map already separate the species (random subsets: ~50%)."""
    monkeypatch.chdir(mixture)
    parts, loader, state, sigma2, mix = _mixture_model(mixture, 25)
    classes = pca_classes(mix, sigma2, lambda: loader.batches(state), len(parts), 2, 60.0)
    agree = float(np.mean(classes.numpy() == _is_50s(parts.particles)))
    assert max(agree, 1 - agree) >= 0.9


def test_self_term_is_the_particles_own_contribution(mixture, monkeypatch) -> None:
    """The leave-one-out score change of :func:`self_term_scores` equals the change of a
    particle's own-class score between a reference built with it and one built without it
    (the first six particles, left out of class 1's M-step), to 25% on average; the other
    class's scores do not move."""
    monkeypatch.chdir(mixture)
    parts, loader, state, sigma2, mix = _mixture_model(mixture, 6)
    state.classes = torch.arange(len(parts)) % 2
    state.classes[:6] = 0
    model = MLModel.initial(torch.stack([mix, mix]), sigma2, PX, current_size=BOX)
    params = EngineParams(particle_diameter_angst=0.8 * BOX * PX, seeded_classes=True)
    sampling = Sampling(align=False)
    models = []
    for skip in (0, 1):
        batches = list(loader.batches(state))[skip:]
        sums, _ = expectation_pass(model, batches, sampling, params)
        models.append(maximise(model, sums, params, sampling))
    batches = list(loader.batches(state))
    points = fourier_points(BOX, BOX // 2, "cpu")
    changes, predicted = [], []
    mask = soft_sphere((BOX, BOX), 0.4 * BOX, 5.0)
    for batch in batches:
        s2 = sigma2[batch.optics_group]
        masked = mask_images(
            batch.data, batch.ctf2, s2, mask, zero_mask=False, generator=torch.Generator()
        )
        data, ctf2 = points.gather(masked), points.gather(batch.ctf2)
        inv_s2 = (1 / s2[:, points.shell]).float()
        poses = pose_grid(sampling, batch, 10.0, None)
        s_with, s_without = (
            score_batch(Projector(m.references), data, ctf2, inv_s2, batch.tilt_rotations,
                        poses, points, PX)[:, :, 0, 0]
            for m in models
        )  # fmt: skip
        changes.append(s_without - s_with)
        mats = slice_matrices(batch.tilt_rotations, poses.rotations)[:, 0]
        predicted.append(self_term_scores(
            Projector(models[0].references), data, ctf2, inv_s2, mats, points, batch.classes,
            models[0].self_denominator,
        ))  # fmt: skip
    change, predicted = torch.cat(changes), torch.cat(predicted)
    left_out = torch.arange(len(parts)) < 6
    kept = ~left_out & (state.classes == 0)
    # the kept particles of class 1 see only the signal that left with the six
    own = change[left_out, 0].mean() - change[kept, 0].mean()
    assert float(own / predicted[left_out, 0].mean()) == pytest.approx(1.0, abs=0.25)
    assert float(own.abs()) > 10 * float(change[left_out, 1].abs().mean())
    assert torch.all(predicted[:, 1][state.classes == 0] == 0)
