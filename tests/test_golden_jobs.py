"""Refine3D, Class3D and the jobs around them write the same files as when the golden files
in ``tests/data/golden/`` were made: ``job.star``, ``run_data.star`` (Class3D: its last
``run_itNNN_data.star``), ``postprocess.star`` and ``relion_locres.star`` text for text, and
the maps byte for byte (their SHA-256 in ``maps.sha256``).

The tiny project is the one of ``test_refine3d.py`` (16 particles, 13 tilts, 2D stacks at box
24, bin 2, 20 Å/px) with a de novo solvent mask; Class3D uses ``test_class3d.py``'s settings
(K=2 without alignment, the E-step limited to 60 Å), for 2 iterations.

Only what must differ from run to run is ignored: the time and date starfile writes into the
first line of every STAR file and mrcfile into a map's first header label, and the project's
absolute path should one appear (none does now: the jobs run inside the project with relative
paths). PIDs live in ``job.pid``, which is
not compared. Nothing else is: a changed digit of a likelihood fails.

The jobs run with one torch thread: the thread count sets the order in which floating-point
sums add up, and so the last digits of likelihoods and maps (a run setting, not run-to-run
noise). The files hold for the torch build recorded in ``torch.txt`` and for one CPU vector
unit (:data:`GOLDEN`); another build or unit is skipped. After a deliberate change of outputs,
regenerate them with ``SUBTOMO_UPDATE_GOLDEN=1 python3 -m pytest tests/test_golden_jobs.py``
(every set whose machine you have) and say why in the commit.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from subtomo.cli.main import app

#: the golden sets: the CPU's vector unit (torch.backends.cpu.get_cpu_capability(): AVX512,
#: AVX2, ...) picks the MKL and ATen kernels and so the order of their sums, and a refinement
#: carries a changed last digit into the poses (an AVX2 EPYC and an AVX512 machine differ from
#: the 7th digit of an angle). The top-level set was made on the vector unit named in its
#: ``cpu.txt``; another unit may have its own set in a sub-folder of that name, holding the
#: files that differ from the top-level set. A machine with neither is skipped (make its set
#: by regenerating there: the sub-folder is created).
GOLDEN_SETS = Path(__file__).resolve().parent / "data" / "golden"
CPU = torch.backends.cpu.get_cpu_capability()
TOP_CPU = (GOLDEN_SETS / "cpu.txt").read_text().strip()
GOLDEN = GOLDEN_SETS if CPU == TOP_CPU else GOLDEN_SETS / CPU
UPDATE = os.environ.get("SUBTOMO_UPDATE_GOLDEN") == "1"


def _golden(name: str) -> str:
    """The golden text of ``name`` for this machine (its vector unit's, else the top level's)."""
    own = GOLDEN / name
    return (own if own.is_file() else GOLDEN_SETS / name).read_text()


def _write_golden(name: str, text: str) -> None:
    """Write ``text`` as golden ``name``; a vector unit's set keeps only what differs."""
    GOLDEN.mkdir(parents=True, exist_ok=True)
    path = GOLDEN / name
    if GOLDEN != GOLDEN_SETS and (GOLDEN_SETS / name).read_text() == text:
        path.unlink(missing_ok=True)
    else:
        path.write_text(text)


#: golden name -> file in the project
TEXTS = {
    "refine3d_job.star": "r1/job.star",
    "refine3d_run_data.star": "r1/run_data.star",
    "class3d_job.star": "c1/job.star",
    "class3d_run_it002_data.star": "c1/run_it002_data.star",
    "postprocess_job.star": "pp/job.star",
    "postprocess.star": "pp/postprocess.star",
    "localres_job.star": "lr/job.star",
    "relion_locres.star": "lr/relion_locres.star",
}
MAPS = [
    "rec/merged.mrc",
    "rec/half1.mrc",
    "msk/mask.mrc",
    "r1/run_class001.mrc",
    "r1/run_half1_class001_unfil.mrc",
    "r1/run_half2_class001_unfil.mrc",
    "c1/run_it002_class001.mrc",
    "c1/run_it002_class002.mrc",
    "pp/postprocess.mrc",
    "pp/postprocess_masked.mrc",
    "lr/relion_locres.mrc",
    "lr/relion_locres_filtered.mrc",
]
_CREATED = re.compile(r"at \d\d:\d\d:\d\d on \d\d/\d\d/\d{4}")
_LABEL_TIME = re.compile(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
_LABELS = slice(224, 1024)  # the ten 80-byte labels of an MRC header


def _invoke(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Simulate, extract, reconstruct, a de novo mask, Refine3D, Class3D, PostProcess and
    LocalRes, single-threaded, inside the project directory."""
    if not UPDATE and not GOLDEN.is_dir():
        pytest.skip(f"golden files made on {TOP_CPU}, none for {CPU}")
    if not UPDATE and _golden("torch.txt").strip() != torch.__version__:
        pytest.skip(f"golden files made with torch {_golden('torch.txt')}")
    root = tmp_path_factory.mktemp("golden") / "p"
    threads = torch.get_num_threads()
    cwd = Path.cwd()
    try:
        torch.set_num_threads(1)
        _invoke(["simulate", "--out", str(root), "--particles", "16", "--tilt-step", "10",
                 "--noise", "gaussian", "--snr", "0.1", "--pose-error-deg", "6",
                 "--shift-error-px", "1.5", "--seed", "2"])  # fmt: skip
        os.chdir(root)
        cpu = ["--device", "cpu"]
        _invoke(["extract", "--p", "particles_picked.star", "--t", "tomograms.star",
                 "--box", "24", "--bin", "2", "--float32", "--o", "ext", *cpu])  # fmt: skip
        _invoke(["reconstruct", "--ios", "ext/optimisation_set.star", "--o", "rec", *cpu])
        _invoke(["mask", "--denovo", "--box-size", "24", "--outer-radius", "9",
                 "--width_soft_edge", "3", "--angpix", "20", "--o", "msk", *cpu])  # fmt: skip
        _invoke(["refine3d", "--ios", "ext/optimisation_set.star", "--ref", "rec/merged.mrc",
                 "--solvent_mask", "msk/mask.mrc", "--ini_high", "60", "--healpix_order", "3",
                 "--auto_local_healpix_order", "3", "--offset_range", "1", "--offset_step",
                 "1", "--iter", "3", "--random_seed", "4", "--o", "r1", *cpu])  # fmt: skip
        _invoke(["class3d", "--ios", "ext/optimisation_set.star", "--ref", "rec/merged.mrc",
                 "--solvent_mask", "msk/mask.mrc", "--K", "2", "--iter", "2", "--skip_align",
                 "--strict_highres_exp", "60", "--particle_diameter", "384",
                 "--random_seed", "2", "--o", "c1", *cpu])  # fmt: skip
        _invoke(["postprocess", "--i", "r1/run_half1_class001_unfil.mrc", "--mask",
                 "msk/mask.mrc", "--adhoc_bfac", "-100", "--o", "pp", *cpu])  # fmt: skip
        _invoke(["localres", "--i", "r1/run_half1_class001_unfil.mrc", "--mask",
                 "msk/mask.mrc", "--locres_sampling", "60", "--o", "lr", *cpu])  # fmt: skip
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return root


def _normalised(text: str, root: Path) -> str:
    """``text`` without the run's time stamps and with the project path as ``<project>``."""
    return _CREATED.sub("at <time>", text).replace(str(root.resolve()), "<project>")


def _map_bytes(path: Path) -> bytes:
    """The file without the time stamp of its header labels ("Created by mrcfile.py ...")."""
    data = path.read_bytes()
    labels = _LABEL_TIME.sub(b"YYYY-MM-DD hh:mm:ss", data[_LABELS])
    return data[: _LABELS.start] + labels + data[_LABELS.stop :]


def _map_hashes(root: Path) -> str:
    return "".join(
        f"{hashlib.sha256(_map_bytes(root / name)).hexdigest()}  {name}\n" for name in MAPS
    )


def test_star_files_match_the_golden_files(project) -> None:
    """Every compared STAR file is the golden one but for the time it was written."""
    if UPDATE:
        _write_golden("torch.txt", torch.__version__ + "\n")
        for golden, name in TEXTS.items():
            _write_golden(golden, _normalised((project / name).read_text(), project))
    for golden, name in TEXTS.items():
        got = _normalised((project / name).read_text(), project)
        assert got == _golden(golden), f"{name} differs from {golden}"


def test_maps_match_the_golden_files(project) -> None:
    """Every compared map is byte for byte the golden run's."""
    if UPDATE:
        _write_golden("maps.sha256", _map_hashes(project))
    assert _map_hashes(project) == _golden("maps.sha256")
