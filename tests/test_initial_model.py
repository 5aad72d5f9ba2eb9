"""``subtomo initial-model`` and ``subtomo flip-hand``: map alignment (both hands, symmetry
axes), the de novo model from random orientations against the simulated truth, bad input."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from subtomo.cli.main import app
from subtomo.data import ParticleSet
from subtomo.errors import InputError
from subtomo.geometry import euler_to_matrix, rotation_angle_deg
from subtomo.io import read_mrc, write_mrc
from subtomo.jobs.extract import ExtractParams
from subtomo.jobs.extract import run as run_extract
from subtomo.jobs.initial_model import InitialModelParams, run
from subtomo.masks import soft_sphere
from subtomo.ml.align_maps import (
    align_maps,
    masked_correlation,
    mirror_z,
    symmetrise_volume,
    symmetry_frame,
    transform_volume,
)
from subtomo.ml.initial_model import GradientSchedule, minibatch, random_rotations
from subtomo.simulate import rescale_map

PX = 20.0
BOX = 24
DEMO = Path(__file__).resolve().parents[1] / "src" / "subtomo" / "demo_data"


@pytest.fixture(scope="module")
def ribosome() -> torch.Tensor:
    """The 70S ribosome at 20 Å/px in a 24-voxel box."""
    volume, px = read_mrc(DEMO / "ribosome70S_4v4r_5A.mrc.gz")
    return rescale_map(volume.float(), px, PX, BOX)


def _rotation(rot: float, tilt: float, psi: float) -> torch.Tensor:
    return euler_to_matrix(torch.tensor(rot), torch.tensor(tilt), torch.tensor(psi)).double()


def test_mirror_z_keeps_the_centre_and_is_its_own_inverse(ribosome) -> None:
    m = mirror_z(ribosome)
    assert torch.equal(mirror_z(m), ribosome)
    c = BOX // 2
    assert torch.equal(m[c], ribosome[c])
    assert torch.equal(m[c + 3], ribosome[c - 3])


def test_align_maps_finds_the_rotation_shift_and_hand(ribosome) -> None:
    """A rotated, shifted mirror image with noise: the alignment says "mirrored", recovers
    the rotation to a few degrees and correlates far better than the wrong hand."""
    r = _rotation(37.0, 71.0, -123.0)
    moved = transform_volume(ribosome, r[None].float(), torch.tensor([[1.0, -2.0, 1.0]]))[0]
    noisy = mirror_z(moved) + 0.1 * ribosome.std() * torch.randn(ribosome.shape)
    a = align_maps(ribosome, noisy, PX, 2.5 * PX, healpix_order=1)
    assert a.mirrored
    assert a.correlation > 0.95
    assert a.other_hand_correlation < a.correlation - 0.05
    # undo: the mirror of the moved map, put back, is the original
    back = transform_volume(mirror_z(noisy), a.rotation[None].float(), a.shift_px[None].float())
    mask = soft_sphere((BOX,) * 3, BOX / 2 - 3, 2.0)
    assert masked_correlation(back[0], ribosome, mask) > 0.9
    # the rotation found is the inverse of the one applied
    assert float(rotation_angle_deg(a.rotation, r.T)) < 6.0


def test_symmetry_frame_puts_the_axes_on_the_groups(ribosome) -> None:
    """A D3 map turned by a random rotation: the frame found makes it D3 again, the original
    up to the group's normaliser (a turn by 60 deg about z swaps the two sets of 2-fold
    axes)."""
    sym = symmetrise_volume(ribosome, "D3")
    r = _rotation(20.0, 50.0, 75.0)
    turned = transform_volume(sym, r[None].float(), torch.tensor([[1.0, 0.0, -1.0]]))[0]
    rot, shift, cc = symmetry_frame(turned, "D3", PX, 2.5 * PX, healpix_order=1)
    placed = transform_volume(turned, rot[None].float(), shift[None].float())[0]
    mask = soft_sphere((BOX,) * 3, BOX / 2 - 3, 2.0)
    assert cc > 0.95
    assert masked_correlation(symmetrise_volume(placed, "D3"), placed, mask) > 0.95
    frames = transform_volume(sym, torch.stack([_rotation(0.0, 0.0, 0.0),
                                                _rotation(60.0, 0.0, 0.0)]).float())  # fmt: skip
    assert max(masked_correlation(placed, f, mask) for f in frames) > 0.9


def test_schedule_and_minibatches() -> None:
    s = GradientSchedule(iterations=11, subset_start=10, subset_end=30,
                         resolution_start_angst=60, resolution_end_angst=30,
                         resolution_fraction=0.5)  # fmt: skip
    assert s.subset(0, 100) == 10 and s.subset(5, 100) == 30 and s.subset(10, 20) == 20
    assert s.resolution_angst(0) == pytest.approx(60) and s.resolution_angst(5) == pytest.approx(30)
    assert s.resolution_angst(2) == pytest.approx(1 / (0.6 / 60 + 0.4 / 30))
    batches = [minibatch(i, 10, 25, seed=3) for i in range(2)]
    assert all(len(set(b)) == 10 for b in batches) and not (batches[0] == batches[1]).all()
    assert (minibatch(1, 10, 25, seed=3) == batches[1]).all()
    assert len(minibatch(0, 40, 25, seed=3)) == 25
    r = random_rotations(500, torch.Generator().manual_seed(0))
    assert torch.allclose(r @ r.transpose(1, 2), torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert abs(float(r[:, 2, 2].mean())) < 0.1  # uniform: no preferred axis


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """60 ribosomes in random orientations, 21 tilts, box 32 at 20 Å, SNR 0.05, 2D stacks."""
    root = tmp_path_factory.mktemp("im") / "project"
    result = CliRunner().invoke(app, [
        "simulate", "--out", str(root), "--preset", "tiny", "--pixel-size", str(PX),
        "--tilt-step", "6", "--noise", "gaussian", "--snr", "0.05", "--box", "32",
        "--particles", "60", "--tomogram-size", "512,512,96",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    with contextlib.chdir(root):
        run_extract(ExtractParams(
            particles="particles_picked.star", tomograms="tomograms.star", box=32,
            float16=False, output_dir="ext", device="cpu",
        ))  # fmt: skip
    return root


def _frame_error_deg(estimated: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Angles (deg) between estimated ``A_part`` and the true ones once the de novo map's
    arbitrary frame is taken out: a map turned by ``G`` has ``A_est = A_true G^T``, so every
    ``A_true^T A_est`` is ``G^T``; the one with most others within 20 deg is taken."""
    rel = true.transpose(1, 2) @ estimated
    agree = (rotation_angle_deg(rel[:, None], rel[None]) < 20).sum(1)
    return rotation_angle_deg(rel, rel[int(agree.argmax())])


def test_initial_model_converges_to_the_truth_from_random_orientations(project) -> None:
    """From random-orientation averages, 8 mini-batch iterations find poses that agree with
    the true ones up to one rotation of the whole map (impossible for a blob, or for the
    mirror image) and a map of the truth's shape; RELION's files are written."""
    with contextlib.chdir(project):
        result = CliRunner().invoke(app, [
            "initial-model", "--ios", "ext/optimisation_set.star", "--iter", "8",
            "--grad_ini_subset", "30", "--grad_fin_subset", "60", "--ini_high", "100",
            "--maxres", "50", "--particle_diameter", "500", "--device", "cpu",
            "--grad_write_iter", "4", "--o", "InitialModel/job001",
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
        job = Path("InitialModel/job001")
        for name in ("run_it004_class001.mrc", "run_it008_data.star", "run_it008_model.star",
                     "run_it008_optimiser.star", "run_it008_sampling.star", "initial_model.mrc",
                     "report.html", "it008_class001_sections.png"):  # fmt: skip
            assert (job / name).is_file(), name
        estimated = ParticleSet.read(job / "run_it008_data.star").particle_matrices().double()
        true = ParticleSet.read("particles.star").particle_matrices().double()
        truth, _ = read_mrc("truth.mrc")
        final, _ = read_mrc(job / "initial_model.mrc")
    error = _frame_error_deg(estimated, true)
    # random poses: median 126 deg
    assert float(error.median()) < 25.0
    assert float((error < 30).double().mean()) > 0.6
    a = align_maps(truth, final, PX, 50.0, healpix_order=1, mirror=False)
    assert a.correlation > 0.9


def test_symmetry_is_applied_after_the_c1_run(project) -> None:
    """``--sym C2`` runs C1 and writes the map turned onto the C2 axis and symmetrised."""
    with contextlib.chdir(project):
        run(InitialModelParams(
            ios="ext/optimisation_set.star", iter=1, sym="C2", grad_ini_subset=20,
            ini_high=100, maxres=100, particle_diameter=500, device="cpu",
            output_dir="InitialModel/job002",
        ))  # fmt: skip
        final, _ = read_mrc("InitialModel/job002/initial_model.mrc")
        report = Path("InitialModel/job002/report.html").read_text()
    mask = soft_sphere(final.shape, final.shape[-1] / 2 - 3, 2.0)
    assert masked_correlation(final, symmetrise_volume(final, "C2"), mask) > 0.99
    assert "C2 applied after C1" in report


def _written(job: Path, names: list[str]) -> dict[str, bytes]:
    """The files' bytes, without the time stamp starfile writes into a STAR file's first line
    and mrcfile into a map's labels, and with the job directory's name (in the paths the
    STAR files hold) replaced by ``JOB``."""
    out = {}
    for name in names:
        data = (job / name).read_bytes()
        if name.endswith(".star"):
            out[name] = data.split(b"\n", 1)[1].replace(str(job).encode(), b"JOB")
        else:
            out[name] = data[:224] + data[1024:]
    return out


def test_continue_is_bit_identical_to_the_uninterrupted_run(project) -> None:
    """A run continued from the checkpoint of its first iteration (files copied to a new
    directory, as after a kill) writes the same maps and STAR files, byte for byte, as the
    run that was not interrupted; the job.star of the continue says so."""
    args = ["initial-model", "--ios", "ext/optimisation_set.star", "--iter", "3", "--K", "2",
            "--grad_ini_subset", "20", "--grad_fin_subset", "30", "--ini_high", "100",
            "--maxres", "80", "--particle_diameter", "500", "--device", "cpu"]  # fmt: skip
    names = ["run_it003_class001.mrc", "run_it003_class002.mrc", "run_it003_data.star",
             "run_it003_model.star", "initial_model.mrc"]  # fmt: skip
    with contextlib.chdir(project):
        result = CliRunner().invoke(app, [*args, "--o", "InitialModel/whole"])
        assert result.exit_code == 0, result.output
        whole = Path("InitialModel/whole")
        cut = Path("InitialModel/cut")
        cut.mkdir()
        for path in [*whole.glob("run_it001_*"), whole / "job.star"]:
            shutil.copy(path, cut / path.name)
        result = CliRunner().invoke(app, ["initial-model", "--continue", str(cut)])
        assert result.exit_code == 0, result.output
        assert "rlnJobIsContinue\t\t\t1" in (cut / "job.star").read_text()
        assert _written(cut, names) == _written(whole, names)
        # the continue resumed after iteration 1 (it did not start again)
        assert "Continuing from iteration 1" in (cut / "run.out").read_text()


def test_3d_pseudo_subtomograms_are_refused_in_one_line(project) -> None:
    """The ML engine reads 2D stacks only (as Class3D and Refine3D): particles extracted as
    3D pseudo-subtomograms get one error naming the file and column, and no job directory."""
    with contextlib.chdir(project):
        run_extract(ExtractParams(
            particles="particles_picked.star", tomograms="tomograms.star", box=32,
            stack2d=False, float16=False, output_dir="ext3d", device="cpu",
        ))  # fmt: skip
        with pytest.raises(InputError, match="3D pseudo-subtomograms") as err:
            run(InitialModelParams(ios="ext3d/optimisation_set.star", output_dir="InitialModel/3d"))
        assert err.value.column == "rlnTomoSubTomosAre2DStacks"
        assert not Path("InitialModel/3d").exists()


def test_angle_priors_are_required_for_sigma_tilt(project) -> None:
    with contextlib.chdir(project), pytest.raises(InputError, match="rlnAngleTiltPrior"):
        run(InitialModelParams(ios="ext/optimisation_set.star", sigma_tilt=10.0,
                               output_dir="InitialModel/job003"))  # fmt: skip
    assert not (project / "InitialModel" / "job003").exists()


def test_flip_hand_writes_the_mirror_image(ribosome) -> None:
    write_mrc("map.mrc", ribosome, PX)
    result = CliRunner().invoke(app, ["flip-hand", "--i", "map.mrc", "--o", "FlipHand/job001"])
    assert result.exit_code == 0, result.output
    flipped, px = read_mrc("FlipHand/job001/flipped.mrc")
    assert px == pytest.approx(PX)
    assert torch.equal(flipped, mirror_z(ribosome))


@pytest.mark.parametrize(
    ("change", "message"),
    [({"K": 0}, "--K"), ({"sym": "X9"}, "--sym"), ({"grad_momentum": 1.0}, "--grad_momentum")],
)
def test_bad_options_are_one_line_errors(change, message) -> None:
    params = InitialModelParams(ios="missing.star", **change)
    with pytest.raises(InputError, match=message):
        run(params)
    assert not Path("InitialModel").exists()


def test_the_ml_options_are_declared_once() -> None:
    """Class3D, Refine3D and the initial model take every option they share from
    ``project.options.ML_OPTIONS`` (or ``ParticleInputs``): same flags, help and unit (only
    defaults differ); a redeclared copy with its own help or flags fails."""
    from subtomo.jobs.class3d import Class3DParams
    from subtomo.jobs.refine3d import Refine3DParams
    from subtomo.project.options import ML_OPTIONS, options_of

    seen: dict[str, set] = {}
    for params_type in (Class3DParams, Refine3DParams, InitialModelParams):
        for _f, meta in options_of(params_type):
            seen.setdefault(meta.flags[0], set()).add(
                (meta.flags, meta.help.split(" (default")[0], meta.unit)
            )
    differ = {flags for flags, v in seen.items() if len(v) > 1}
    # Refine3D's --ref names two half maps (Class3D's: K maps); its --particles has --i
    assert differ == {"--ref", "--particles"}
    declared = {meta.flags[0] for meta in ML_OPTIONS.values()}
    assert {"--ini_high", "--K", "--iter", "--tau2_fudge", "--particle_diameter"} <= declared
