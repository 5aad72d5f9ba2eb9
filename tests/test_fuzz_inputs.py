"""A generated corpus of malformed inputs, run through the real command line in-process.

Every case starts from a valid tiny project (``subtomo simulate --preset tiny``, extracted
and reconstructed once per module) and breaks one thing: a STAR cell, block or column, an
MRC header or its values, a tilt image, an mdoc section, a command-line option. Each must
end either in exactly one ``error:`` line on stderr naming the file or option and the cause,
a non-zero exit status and no traceback, or in a stated accepted behaviour (exit status 0);
and no input file may change. A failure here means a user would see a traceback, a wrong
cause, or a bad input silently turned into output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from subtomo.cli.main import run_cli
from subtomo.errors import InputError
from subtomo.io import read_mdoc

Maker = Callable[[Path, Path], list[str]]  # (project, folder for this case's files) -> argv


@dataclasses.dataclass(frozen=True)
class Case:
    """One corpus entry: how to build its inputs and command line, and what must happen.

    ``expect``: substrings of the one error line (file or option, and cause); empty means
    the input is accepted and the command must succeed."""

    id: str
    make: Maker
    expect: tuple[str, ...]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The tiny simulated project, its particles extracted as 2D stacks at box 32
    (Extract/job001) and reconstructed (Reconstruct/job002), and ``classified.star``: the
    extracted particles with rlnClassNumber 1, 2, 1, ... and rlnMaxValueProbDistribution."""
    root = tmp_path_factory.mktemp("fuzz") / "project"
    assert run_cli(["simulate", "--preset", "tiny", "--out", str(root)]) == 0
    cwd = Path.cwd()
    os.chdir(root)
    try:
        common = ["--device", "cpu"]
        assert run_cli(["extract", "--p", "particles.star", "--t", "tomograms.star",
                        "--b", "32", *common]) == 0  # fmt: skip
        assert run_cli(["reconstruct", "--ios", "Extract/job001/optimisation_set.star",
                        *common]) == 0  # fmt: skip
    finally:
        os.chdir(cwd)
    blocks = starfile.read(root / "Extract/job001/particles.star", always_dict=True)
    table = blocks["particles"]
    table["rlnClassNumber"] = [1 + k % 2 for k in range(len(table))]
    table["rlnMaxValueProbDistribution"] = 0.5
    starfile.write(blocks, root / "classified.star")
    return root


# --- building malformed inputs --------------------------------------------------------------


def _text(path: Path, out: Path, old: str, new: str, encoding: str = "utf-8") -> Path:
    """``path`` copied to ``out`` with the first ``old`` replaced by ``new``."""
    text = path.read_text()
    assert old in text, old
    out.write_bytes(text.replace(old, new, 1).encode(encoding))
    return out


def _cell(path: Path, out: Path, block: str, column: str, row: int, value: str) -> Path:
    """``path`` copied to ``out`` with one cell (1-based ``row``) set to ``value``."""
    blocks = starfile.read(path, always_dict=True)
    table = blocks[block]
    if isinstance(table, dict):
        table[column] = value
    else:
        table[column] = table[column].astype(object)
        table.loc[row - 1, column] = value
    starfile.write(blocks, out)
    return out


def _map(out: Path, data: np.ndarray, voxel: float = 10.0) -> Path:
    """An MRC file of ``data`` (float32) with voxel size ``voxel`` Å (NaN and infinity
    allowed: mrcfile's warnings about them are silenced)."""
    with warnings.catch_warnings(), mrcfile.new(out, overwrite=True) as mrc:
        warnings.simplefilter("ignore", RuntimeWarning)
        mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
        mrc.voxel_size = voxel
    return out


def _half(p: Path, k: int = 1) -> Path:
    return p / f"Reconstruct/job002/half{k}.mrc"


def _spoiled(p: Path, d: Path, value: float, name: str = "map.mrc") -> Path:
    """half1 with one voxel set to ``value`` (NaN or infinity)."""
    data = mrcfile.read(_half(p)).copy()
    data[3, 4, 5] = value
    return _map(d / name, data)


def _revoxeled(p: Path, d: Path, voxel: float, name: str = "half1.mrc") -> Path:
    """half1 with another voxel size in its header."""
    return _map(d / name, mrcfile.read(_half(p)), voxel)


def _with_tilt_table(p: Path, d: Path, edit: Callable[[Path, Path], Path]) -> Path:
    """A tomograms.star in ``d`` whose per-tilt file is ``edit(original, copy)``."""
    (d / "tilt_series").mkdir()
    edit(p / "tilt_series/TS_01.star", d / "tilt_series/TS_01.star")
    shutil.copy(p / "tomograms.star", d / "tomograms.star")
    return d / "tomograms.star"


def _micrograph(p: Path, d: Path, write: Callable[[Path], None]) -> Path:
    """A tomograms.star whose first tilt image is a file made by ``write``."""
    bad = d / "tilt.mrc"
    write(bad)
    return _with_tilt_table(
        p, d, lambda src, out: _cell(src, out, "TS_01", "rlnMicrographName", 1, str(bad))
    )


# --- running a command and checking its output ----------------------------------------------


def _reconstruct(particles: Path | str, tomograms: Path | str, *extra: str) -> list[str]:
    return ["reconstruct", "--p", str(particles), "--t", str(tomograms), "--b", "32",
            "--device", "cpu", *extra]  # fmt: skip


def _checksums(folder: Path) -> dict[Path, str]:
    """sha256 of every regular file under ``folder``."""
    return {
        path: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in folder.rglob("*")
        if path.is_file()
    }


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@pytest.fixture(scope="module")
def inputs(project: Path) -> dict[Path, tuple[tuple[int, int], str]]:
    """(size and mtime, sha256) of every file of the project before the cases run."""
    sums = _checksums(project)
    return {path: (_stamp(path), digest) for path, digest in sums.items()}


def _assert_unchanged(inputs: dict[Path, tuple[tuple[int, int], str]]) -> None:
    """Every project file still has its sha256 (re-hashed only when its stamp moved)."""
    for path, (stamp, digest) in inputs.items():
        assert path.is_file(), f"{path} is gone"
        if _stamp(path) != stamp:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{path} changed"


def _check_outcome(code: int, out: str, err: str, expect: tuple[str, ...]) -> None:
    assert "Traceback" not in out + err, out + err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if not expect:
        assert code == 0 and not errors, err
        return
    assert code != 0 and len(errors) == 1, (code, err)
    for part in expect:
        assert part in errors[0], (part, errors[0])


def _run(case: Case, project: Path, inputs: dict, capsys) -> None:
    folder = project / "fuzz" / case.id
    folder.mkdir(parents=True)
    argv = case.make(project, folder)
    before = _checksums(folder)
    code = run_cli(argv)
    out, err = capsys.readouterr()
    _check_outcome(code, out, err, case.expect)
    after = _checksums(folder)
    assert {p: after.get(p) for p in before} == before, "an input file changed"
    _assert_unchanged(inputs)


# --- the corpus (hand-formatted tables) ---------------------------------------------------
# fmt: off

P, T, X = "particles.star", "tomograms.star", "Extract/job001/particles.star"
_ROOT = os.geteuid() == 0
FINITE, POSITIVE = "expected a finite number", "expected a positive number"


def _particles_cells() -> list[Case]:
    """Every number a particle row carries, spoilt three ways (read before any work)."""
    columns = [f"rlnCenteredCoordinate{a}Angst" for a in "XYZ"]
    columns += [f"rlnAngle{a}" for a in ("Rot", "Tilt", "Psi")]
    columns += [f"rlnOrigin{a}Angst" for a in "XYZ"]
    cases = []
    for column in columns:
        for value in ("abc", "nan", "inf"):
            cases.append(Case(
                f"particles-{column}-{value}",
                lambda p, d, c=column, v=value: _reconstruct(
                    _cell(p / P, d / P, "particles", c, 3, v), p / T),
                (P, f"column {column}, row 3", FINITE),
            ))
    return cases


def _optics_cells() -> list[Case]:
    cases = []
    for column, source in (
        ("rlnTomoTiltSeriesPixelSize", P),
        ("rlnImagePixelSize", X),
        ("rlnImageSize", X),
        ("rlnTomoSubtomogramBinning", X),
    ):
        for value, cause in (("-10", POSITIVE), ("0", POSITIVE), ("nan", FINITE), ("x", FINITE)):
            if source == P:
                make = lambda p, d, c=column, v=value: _reconstruct(  # noqa: E731
                    _cell(p / P, d / P, "optics", c, 1, v), p / T)
            else:
                make = lambda p, d, c=column, v=value: _reconstruct(  # noqa: E731
                    _cell(p / X, d / P, "optics", c, 1, v), p / T, "--from", "stacks")
            cases.append(Case(f"optics-{column}-{value}", make,
                              (P, f"block data_optics, column {column}", cause)))
    return cases


def _particles_structure() -> list[Case]:
    def text(old: str, new: str) -> Maker:
        return lambda p, d: _reconstruct(_text(p / P, d / P, old, new), p / T)

    def raw(data: bytes) -> Maker:
        def make(p: Path, d: Path) -> list[str]:
            (d / P).write_bytes(data)
            return _reconstruct(d / P, p / T)

        return make

    def truncated(p: Path, d: Path) -> list[str]:
        text = (p / P).read_text()
        (d / P).write_text(text[: text.rindex("\t", 0, len(text) - 40)])
        return _reconstruct(d / P, p / T)

    def empty_table(p: Path, d: Path) -> list[str]:
        text = (p / P).read_text()
        (d / P).write_text(text[: text.index("TS_01\tTS_01/1")])
        return _reconstruct(d / P, p / T)

    def fifo(p: Path, d: Path) -> list[str]:
        os.mkfifo(d / P)
        return _reconstruct(d / P, p / T)

    def crlf(p: Path, d: Path) -> list[str]:
        (d / P).write_bytes((p / P).read_bytes().replace(b"\n", b"\r\n"))
        return _reconstruct(d / P, p / T)

    def no_optics(p: Path, d: Path) -> list[str]:
        blocks = starfile.read(p / P, always_dict=True)
        del blocks["optics"]
        starfile.write(blocks, d / P)
        return _reconstruct(d / P, p / T)

    def extra_column(p: Path, d: Path) -> list[str]:
        blocks = starfile.read(p / P, always_dict=True)
        blocks["particles"]["myScore"] = 0.5
        starfile.write(blocks, d / P)
        return _reconstruct(d / P, p / T)

    noise = bytes(random.Random(22).getrandbits(8) for _ in range(3000))
    return [
        Case("particles-empty-file", raw(b""), (P, "no data_ blocks")),
        Case("particles-nul-bytes", raw(b"\0" * 500), (P, "no data_ blocks")),
        Case("particles-random-bytes", raw(noise), (P, "not UTF-8 text", "offset")),
        Case("particles-latin1-byte", lambda p, d: _reconstruct(
             _text(p / P, d / P, "ribosome70S", "ribosome\xe970S", "latin-1"), p / T),
             (P, "not UTF-8 text: byte 0xe9", "line")),
        Case("particles-duplicate-block", text("data_particles", "data_particles\n\nloop_\n"
             "_rlnTomoName #1\nTS_01\n\ndata_particles"), (P, "data_particles appears twice")),
        Case("particles-duplicate-optics", text("data_particles", "data_optics\n\n"
             "_rlnOpticsGroup 1\n\ndata_particles"), (P, "data_optics appears twice")),
        Case("particles-no-particles-block", text("data_particles", "data_picks"),
             (P, "missing block data_particles")),
        Case("particles-empty-table", empty_table, (P, "data_particles", "no particles")),
        Case("particles-truncated", truncated, (P, "row 24")),
        Case("particles-extra-value", text("\tribosome70S\n", "\tribosome70S\t7\n"),
             (P, "not a readable STAR file")),
        Case("particles-general-without-value", text("_rlnTomoSubTomosAre2DStacks\t\t\t0",
             "_rlnTomoSubTomosAre2DStacks"), (P, "not a readable STAR file")),
        Case("particles-renamed-coordinate", text("_rlnCenteredCoordinateXAngst",
             "_rlnCenteredCoordinateQAngst"), (P, "column rlnCenteredCoordinateXAngst", "missing")),
        Case("particles-no-tomo-name", text("_rlnTomoName #1", "_rlnTomoNom #1"),
             (P, "column rlnTomoName", "missing required column")),
        Case("particles-unknown-tomogram", text("TS_01\tTS_01/3", "TS_99\tTS_01/3"),
             (P, "column rlnTomoName, row 3", "'TS_99' is not in")),
        Case("particles-unknown-optics-group",
             lambda p, d: _reconstruct(_cell(p / P, d / P, "particles", "rlnOpticsGroup", 2, "7"),
                                       p / T), (P, "row 2", "optics group 7")),
        Case("particles-is-a-directory", lambda p, d: _reconstruct(d, p / T),
             (str(Path("fuzz/particles-is-a-directory")), "is a directory")),
        Case("particles-missing", lambda p, d: _reconstruct(d / "nope.star", p / T),
             ("nope.star", "file not found")),
        Case("particles-fifo", fifo, (P, "not a regular file")),
        Case("particles-random-subset-3",
             lambda p, d: _reconstruct(_cell(p / P, d / P, "particles", "rlnRandomSubset", 5, "3"),
                                       p / T), (P, "column rlnRandomSubset, row 5", "1 or 2")),
        # accepted: files RELION or a Windows editor writes
        Case("particles-crlf-accepted", crlf, ()),
        Case("particles-no-optics-accepted", no_optics, ()),  # built from tomograms.star
        Case("particles-extra-column-accepted", extra_column, ()),  # unknown columns are kept
    ]


def _stacks_cases() -> list[Case]:
    def stacks(edit: Callable[[Path, Path], Path]) -> Maker:
        return lambda p, d: _reconstruct(edit(p / X, d / P), p / T, "--from", "stacks")

    def visible(value: str) -> Maker:
        return stacks(lambda s, o: _cell(s, o, "particles", "rlnTomoVisibleFrames", 2, value))

    def image(value: str) -> Maker:
        return stacks(lambda s, o: _cell(s, o, "particles", "rlnImageName", 4, value))

    return [
        Case("stacks-visible-short", visible("[1,1]"),
             (P, "column rlnTomoVisibleFrames, row 2", "2 entries, expected 21")),
        Case("stacks-visible-not-binary", visible("[" + ",".join(["2"] * 21) + "]"),
             (P, "column rlnTomoVisibleFrames, row 2", "0/1")),
        Case("stacks-visible-text", visible("all"), (P, "rlnTomoVisibleFrames, row 2", "0/1")),
        Case("stacks-image-missing", image("nope_stack2d.mrcs"),
             ("nope_stack2d.mrcs", "file not found")),
        Case("stacks-image-is-directory", lambda p, d: _reconstruct(
            _cell(p / X, d / P, "particles", "rlnImageName", 4, str(d)), p / T, "--from", "stacks"),
             ("is a directory",)),
        Case("stacks-not-2d-flag", stacks(lambda s, o: _text(
            s, o, "_rlnTomoSubTomosAre2DStacks\t\t\t1", "_rlnTomoSubTomosAre2DStacks\t\t\tyes")),
             (P, "data_general")),
    ]


def _tomograms_cases() -> list[Case]:
    def global_cell(column: str, value: str) -> Maker:
        return lambda p, d: _reconstruct(p / P, _cell(p / T, d / T, "global", column, 1, value))

    def tilt_cell(column: str, row: int, value: str) -> Maker:
        return lambda p, d: _reconstruct(p / P, _with_tilt_table(
            p, d, lambda s, o: _cell(s, o, "TS_01", column, row, value)))

    def text(old: str, new: str) -> Maker:
        return lambda p, d: _reconstruct(p / P, _text(p / T, d / T, old, new))

    cases = [
        Case(f"tomograms-{column}-{value}", global_cell(column, value),
             (T, f"block data_global, column {column}, row 1", cause))
        for column, value, cause in (
            ("rlnTomoTiltSeriesPixelSize", "-10", POSITIVE),
            ("rlnTomoTiltSeriesPixelSize", "0", POSITIVE),
            ("rlnTomoTiltSeriesPixelSize", "nan", FINITE),
            ("rlnTomoTiltSeriesPixelSize", "ten", FINITE),
            ("rlnTomoSizeX", "0", POSITIVE),
            ("rlnTomoSizeZ", "-96", POSITIVE),
            ("rlnTomoHand", "0", "expected 1 or -1"),
            ("rlnTomoHand", "2", "expected 1 or -1"),
            ("rlnVoltage", "-300", POSITIVE),
            ("rlnVoltage", "kV", FINITE),
            ("rlnSphericalAberration", "inf", FINITE),
            ("rlnAmplitudeContrast", "nan", FINITE),
        )
    ]
    cases += [
        Case(f"tilts-{column}-{value}", tilt_cell(column, row, value),
             ("TS_01.star", f"block data_TS_01, column {column}, row {row}", FINITE))
        for column, row, value in (
            ("rlnTomoYTilt", 2, "abc"),
            ("rlnTomoZRot", 5, "nan"),
            ("rlnTomoXShiftAngst", 7, "inf"),
            ("rlnDefocusU", 1, "nan"),
            ("rlnDefocusV", 21, "-"),
            ("rlnDefocusAngle", 3, "inf"),
            ("rlnMicrographPreExposure", 4, "abc"),
            ("rlnCtfScalefactor", 6, "nan"),
        )
    ]

    def tilt_file_without_block(p: Path, d: Path) -> list[str]:
        return _reconstruct(p / P, _with_tilt_table(
            p, d, lambda s, o: _text(s, o, "data_TS_01", "data_TS_02")))

    def tilt_file_missing(p: Path, d: Path) -> list[str]:
        return _reconstruct(p / P, _text(p / T, d / T, "tilt_series/TS_01.star", "gone.star"))

    def duplicate_row(p: Path, d: Path) -> list[str]:
        blocks = starfile.read(p / T, always_dict=True)
        blocks["global"] = blocks["global"].iloc[[0, 0]]
        starfile.write(blocks, d / T)
        return _reconstruct(p / P, d / T)

    def frame_count(p: Path, d: Path) -> list[str]:
        blocks = starfile.read(p / T, always_dict=True)
        blocks["global"]["rlnTomoFrameCount"] = 20
        starfile.write(blocks, d / T)
        return _reconstruct(p / P, d / T)

    def raw(data: bytes) -> Maker:
        def make(p: Path, d: Path) -> list[str]:
            (d / T).write_bytes(data)
            return _reconstruct(p / P, d / T)

        return make

    cases += [
        Case("tomograms-renamed-star-file-column",
             text("_rlnTomoTiltSeriesStarFile", "_rlnTomoTiltSeriesStar"),
             (T, "column rlnTomoTiltSeriesStarFile", "missing required column")),
        Case("tomograms-tilt-file-missing", tilt_file_missing,
             (T, "column rlnTomoTiltSeriesStarFile, row 1", "'gone.star' not found")),
        Case("tomograms-tilt-file-without-block", tilt_file_without_block,
             ("TS_01.star", "missing block data_TS_01")),
        Case("tomograms-duplicate-global", text("data_global", "data_global\n\nloop_\n"
             "_rlnTomoName #1\nTS_02\n\ndata_global"), (T, "data_global appears twice")),
        Case("tomograms-duplicate-row", duplicate_row, (T, "row 2", "'TS_01' appears twice")),
        Case("tomograms-frame-count", frame_count,
             (T, "column rlnTomoFrameCount", "20 frames", "21 rows")),
        Case("tomograms-no-name-column", text("_rlnTomoName #1", "_rlnTomo #1"),
             (T, "column rlnTomoName", "missing required column")),
        Case("tomograms-empty-file", raw(b""), (T, "no data_ blocks")),
        Case("tomograms-utf16", lambda p, d: _reconstruct(p / P, _utf16(p / T, d / T)),
             (T, "not UTF-8 text", "offset 0")),
        Case("tomograms-is-a-directory", lambda p, d: _reconstruct(p / P, d),
             ("is a directory",)),
    ]
    return cases


def _utf16(path: Path, out: Path) -> Path:
    out.write_bytes(path.read_text().encode("utf-16"))
    return out


def _tilt_image_cases() -> list[Case]:
    def image(write: Callable[[Path], None]) -> Maker:
        return lambda p, d: _reconstruct(p / P, _micrograph(p, d, write))

    def values(value: float) -> Callable[[Path], None]:
        def write(path: Path) -> None:
            data = np.zeros((1, 256, 256), dtype=np.float32)
            data[0, 10, 20] = value
            _map(path, data)

        return write

    def truncated(path: Path) -> None:
        _map(path, np.zeros((1, 256, 256)))
        path.write_bytes(path.read_bytes()[:-100])

    return [
        Case("tilt-image-nan", image(values(np.nan)), ("tilt.mrc", "NaN or infinite")),
        Case("tilt-image-inf", image(values(np.inf)), ("tilt.mrc", "NaN or infinite")),
        Case("tilt-image-truncated", image(truncated), ("tilt.mrc", "truncated MRC file")),
        Case("tilt-image-text", image(lambda q: q.write_text("not an image")),
             ("tilt.mrc", "not a readable MRC file")),
        Case("tilt-image-empty", image(lambda q: q.write_bytes(b"")),
             ("tilt.mrc", "not a readable MRC file")),
        Case("tilt-image-directory", image(lambda q: q.mkdir()), ("tilt.mrc", "is a directory")),
        Case("tilt-image-missing", image(lambda q: None), ("tilt.mrc", "file not found")),
    ]


def _box_cases() -> list[Case]:
    def extract(*options: str) -> Maker:
        return lambda p, d: ["extract", "--p", str(p / P), "--t", str(p / T), "--device", "cpu",
                             *options]

    def far_away(command: str) -> Maker:
        def make(p: Path, d: Path) -> list[str]:
            blocks = starfile.read(p / P, always_dict=True)
            blocks["particles"]["rlnCenteredCoordinateXAngst"] = 1e5
            starfile.write(blocks, d / P)
            if command == "extract":
                return ["extract", "--p", str(d / P), "--t", str(p / T), "--b", "32"]
            return _reconstruct(d / P, p / T)

        return make

    return [
        Case("extract-box-larger-than-images", extract("--b", "512"),
             ("--box 512 at --bin 1", "spans 512 px", "256 x 256", "TS_01.star")),
        Case("extract-binned-box-larger-than-images", extract("--b", "200", "--bin", "2"),
             ("--box 200 at --bin 2", "spans 400 px")),
        Case("extract-crop-larger-than-box", extract("--b", "32", "--crop", "64"),
             ("--crop 64", "larger than --box 32")),
        Case("extract-box-negative", extract("--b", "-5"), ("--box and --bin", "-5")),
        Case("extract-bin-zero", extract("--bin", "0"), ("--box and --bin", "> 0")),
        Case("reconstruct-box-larger-than-images",
             lambda p, d: _reconstruct(p / P, p / T, "--b", "300"), ("--box 300", "spans 300 px")),
        Case("reconstruct-box-negative",
             lambda p, d: _reconstruct(p / P, p / T, "--b", "-4"), ("--box and --bin", "-4")),
        Case("extract-every-particle-outside", far_away("extract"),
             (P, "no particle has 1 or more visible tilts")),
        Case("reconstruct-every-particle-outside", far_away("reconstruct"),
             (P, "no tilt image of any particle")),
    ]


def _map_cases() -> list[Case]:
    """Maps with NaN/Inf values, no signal, bad voxel sizes or broken files, as the input of
    every command that reads maps."""

    def mask(make_map: Callable[[Path, Path], Path], *extra: str) -> Maker:
        return lambda p, d: ["mask", "--i", str(make_map(p, d)), "--device", "cpu", *extra]

    def fsc(first: bool, make_map: Callable[[Path, Path], Path], *extra: str) -> Maker:
        def make(p: Path, d: Path) -> list[str]:
            bad, good = str(make_map(p, d)), str(_half(p, 2))
            pair = [bad, good] if first else [good, bad]
            return ["fsc", *pair, "--o", str(d / "fsc"), "--device", "cpu", *extra]

        return make

    def post(command: str, make_map: Callable[[Path, Path], Path], *extra: str) -> Maker:
        return lambda p, d: [command, "--i", str(make_map(p, d)), "--i2", str(_half(p, 2)),
                             "--device", "cpu", *extra]

    def post_mask(make_mask: Callable[[Path, Path], Path]) -> Maker:
        return lambda p, d: ["postprocess", "--i", str(_half(p)), "--mask",
                             str(make_mask(p, d)), "--device", "cpu"]

    def nan(p: Path, d: Path) -> Path:
        return _spoiled(p, d, np.nan)

    def inf(p: Path, d: Path) -> Path:
        return _spoiled(p, d, -np.inf)

    def zeros(p: Path, d: Path) -> Path:
        return _map(d / "zeros.mrc", np.zeros((32, 32, 32)))

    def negative_voxel(p: Path, d: Path) -> Path:
        return _revoxeled(p, d, -10.0)

    def no_voxel(p: Path, d: Path) -> Path:
        return _revoxeled(p, d, 0.0)

    def tiny(p: Path, d: Path) -> Path:
        rng = np.random.default_rng(1)
        return _map(d / "tiny.mrc", rng.normal(size=(8, 8, 8)))

    def truncated(p: Path, d: Path) -> Path:
        out = d / "map.mrc"
        out.write_bytes(_half(p).read_bytes()[:5000])
        return out

    def text(p: Path, d: Path) -> Path:
        out = d / "map.mrc"
        out.write_text("EMDB map, honest\n")
        return out

    def image2d(p: Path, d: Path) -> Path:
        return _map(d / "map.mrc", np.ones((1, 32, 32)))

    def wider(p: Path, d: Path) -> Path:
        return _map(d / "map.mrc", np.ones((32, 32, 40)))

    def over_one(p: Path, d: Path) -> Path:
        return _map(d / "mask.mrc", np.full((32, 32, 32), 2.0))

    def nan_mask(p: Path, d: Path) -> Path:
        data = np.ones((32, 32, 32), dtype=np.float32)
        data[0, 0, 0] = np.nan
        return _map(d / "mask.mrc", data)

    nonfinite = "values are NaN or infinite"
    cases = [
        Case("mask-nan", mask(nan), ("map.mrc", nonfinite, "zyx index (3, 4, 5)")),
        Case("mask-inf", mask(inf), ("map.mrc", nonfinite)),
        Case("mask-all-zero", mask(zeros), ("zeros.mrc", "the mask is empty", "0 .. 0")),
        Case("mask-threshold-above-map", mask(lambda p, d: _half(p), "--ini_threshold", "1e9"),
             ("half1.mrc", "the mask is empty", "--ini_threshold 1e+09")),
        Case("mask-negative-voxel-lowpass", mask(negative_voxel, "--lowpass", "30"),
             ("half1.mrc", "voxel size -10 Å in the header", "--angpix")),
        Case("mask-no-voxel-lowpass", mask(no_voxel, "--lowpass", "30"),
             ("half1.mrc", "no voxel size in the header", "--angpix")),
        Case("mask-negative-voxel", mask(negative_voxel), ("half1.mrc", "voxel size -10 Å")),
        Case("mask-truncated", mask(truncated), ("map.mrc", "truncated MRC file")),
        Case("mask-text", mask(text), ("map.mrc", "not a readable MRC file")),
        Case("mask-directory", mask(lambda p, d: d), ("is a directory",)),
        Case("mask-missing", mask(lambda p, d: d / "none.mrc"), ("none.mrc", "file not found")),
        Case("mask-and-nan", lambda p, d: ["mask", "--i", str(_half(p)), "--and",
             str(nan(p, d))], ("map.mrc", nonfinite)),
        Case("mask-or-wrong-shape", lambda p, d: ["mask", "--i", str(_half(p)), "--or",
             str(wider(p, d))], ("map.mrc", "differs from --i")),
        # accepted: a header without voxel size needs none when nothing is filtered
        Case("mask-no-voxel-accepted", mask(no_voxel, "--ini_threshold", "0"), ()),
    ]
    for first in (True, False):
        side = "map1" if first else "map2"
        cases += [
            Case(f"fsc-{side}-nan", fsc(first, nan), ("map.mrc", nonfinite)),
            Case(f"fsc-{side}-inf", fsc(first, inf), ("map.mrc", nonfinite)),
            Case(f"fsc-{side}-zeros", fsc(first, zeros), ("zeros.mrc", "every value", "is 0")),
            Case(f"fsc-{side}-2d", fsc(first, image2d), ("map.mrc", "expected a cubic 3D map")),
        ]
    cases += [
        Case("fsc-negative-voxel", fsc(True, negative_voxel), ("half1.mrc", "voxel size -10 Å")),
        Case("fsc-mask-nan", lambda p, d: ["fsc", str(_half(p)), str(_half(p, 2)), "--mask",
             str(nan_mask(p, d)), "--o", str(d / "fsc")], ("mask.mrc", nonfinite)),
        Case("fsc-negative-voxel-angpix-accepted", fsc(True, negative_voxel, "--angpix", "10"),
             ()),
    ]
    for command in ("postprocess", "localres"):
        cases += [
            Case(f"{command}-nan", post(command, nan), ("map.mrc", nonfinite)),
            Case(f"{command}-inf", post(command, inf), ("map.mrc", nonfinite)),
            Case(f"{command}-zeros", post(command, zeros), ("zeros.mrc", "every value")),
            Case(f"{command}-negative-voxel", post(command, negative_voxel),
                 ("half1.mrc", "voxel size -10 Å in the header")),
            Case(f"{command}-no-voxel", post(command, no_voxel),
                 ("half1.mrc", "no voxel size in the header", "--angpix")),
            Case(f"{command}-size-mismatch", post(command, tiny),
                 ("half2.mrc", "32x32x32 voxels, which differs from half map 1 (8x8x8)")),
        ]
    cases += [
        Case("postprocess-tiny-half-maps", lambda p, d: [
            "postprocess", "--i", str(tiny(p, d)), "--i2",
            str(_map(d / "tiny2.mrc", np.random.default_rng(2).normal(size=(8, 8, 8)))),
            "--device", "cpu"], ("tiny.mrc", "too few Guinier points")),
        Case("postprocess-mask-above-one", post_mask(over_one),
             ("mask.mrc", "values must lie in [0, 1]")),
        Case("postprocess-mask-nan", post_mask(nan_mask), ("mask.mrc", nonfinite)),
        Case("postprocess-mask-wrong-shape", post_mask(wider), ("map.mrc", "differs")),
        Case("postprocess-no-voxel-angpix-accepted",
             post("postprocess", no_voxel, "--angpix", "10", "--adhoc_bfac", "-100"), ()),
    ]
    return cases


def _refinement_cases() -> list[Case]:
    """References and masks of class3d and refine3d (checked before any iteration)."""

    def ios(p: Path) -> str:
        return str(p / "Extract/job001/optimisation_set.star")

    def refine(make_map: Callable[[Path, Path], Path], option: str = "--ref") -> Maker:
        def make(p: Path, d: Path) -> list[str]:
            ref = str(make_map(p, d)) if option == "--ref" else str(_half(p))
            extra = [] if option == "--ref" else [option, str(make_map(p, d))]
            return ["refine3d", "--ios", ios(p), "--ref", ref, "--iter", "1", "--device", "cpu",
                    "--o", str(d / "out"), *extra]

        return make

    def class3d(make_map: Callable[[Path, Path], Path], option: str = "--ref") -> Maker:
        def make(p: Path, d: Path) -> list[str]:
            ref = str(make_map(p, d)) if option == "--ref" else str(_half(p))
            extra = [] if option == "--ref" else [option, str(make_map(p, d))]
            return ["class3d", "--ios", ios(p), "--ref", ref, "--iter", "1", "--skip_align",
                    "--device", "cpu", "--o", str(d / "out"), *extra]

        return make

    def nan(p: Path, d: Path) -> Path:
        return _spoiled(p, d, np.nan, "ref.mrc")

    def inf(p: Path, d: Path) -> Path:
        return _spoiled(p, d, np.inf, "ref.mrc")

    def negative_voxel(p: Path, d: Path) -> Path:
        return _revoxeled(p, d, -10.0, "ref.mrc")

    def nan_mask(p: Path, d: Path) -> Path:
        data = np.ones((32, 32, 32), dtype=np.float32)
        data[1, 2, 3] = np.nan
        return _map(d / "mask.mrc", data)

    def small(p: Path, d: Path) -> Path:
        return _map(d / "ref.mrc", np.ones((16, 16, 16)))

    def other_voxel(p: Path, d: Path) -> Path:
        return _revoxeled(p, d, 10.5, "ref.mrc")

    def mask_over_one(p: Path, d: Path) -> Path:
        return _map(d / "mask.mrc", np.full((32, 32, 32), 1.01))

    def mask_other_voxel(p: Path, d: Path) -> Path:
        return _map(d / "mask.mrc", np.ones((32, 32, 32)), 10.01)

    nonfinite = "values are NaN or infinite"
    cases = [
        Case("refine3d-ref-nan", refine(nan), ("ref.mrc", nonfinite)),
        Case("refine3d-ref-inf", refine(inf), ("ref.mrc", nonfinite)),
        Case("refine3d-ref-negative-voxel", refine(negative_voxel),
             ("ref.mrc", "voxel size -10 Å in the header")),
        Case("refine3d-ref-wrong-box", refine(small),
             ("ref.mrc", "16x16x16 voxels, which differs from the particles' rlnImageSize")),
        Case("refine3d-mask-nan", refine(nan_mask, "--solvent_mask"), ("mask.mrc", nonfinite)),
        Case("class3d-ref-nan", class3d(nan), ("ref.mrc", nonfinite)),
        Case("class3d-ref-inf", class3d(inf), ("ref.mrc", nonfinite)),
        Case("class3d-ref-negative-voxel", class3d(negative_voxel),
             ("ref.mrc", "voxel size -10 Å in the header")),
        Case("class3d-mask-nan", class3d(nan_mask, "--solvent_mask"), ("mask.mrc", nonfinite)),
    ]
    # one rule for both jobs: pixel sizes agree to 0.001 Å, mask values lie in [0, 1]
    other_px = "voxel size 10.5 Å in the header; the particles' pixel size is 10 Å"
    mask_px = "voxel size 10.01 Å in the header; the particles' pixel size is 10 Å"
    for command, job in (("refine3d", refine), ("class3d", class3d)):
        cases += [
            Case(f"{command}-ref-other-voxel", job(other_voxel), ("ref.mrc", other_px)),
            Case(f"{command}-mask-above-one", job(mask_over_one, "--solvent_mask"),
                 ("mask.mrc", "mask values must lie in [0, 1], found 1.01..1.01")),
            Case(f"{command}-mask-other-voxel", job(mask_other_voxel, "--solvent_mask"),
                 ("mask.mrc", mask_px)),
        ]
    return cases


def _cli_cases() -> list[Case]:
    def fixed(*argv: str) -> Maker:
        return lambda p, d: list(argv)

    def select(*options: str, source: str = "classified.star") -> Maker:
        return lambda p, d: ["select", "--i", str(p / source), "--o", str(d / "out"), *options]

    def under_file(command: str) -> Maker:
        def make(p: Path, d: Path) -> list[str]:
            (d / "file").write_text("a regular file\n")
            target = str(d / "file" / "out")
            if command == "fsc":
                return ["fsc", str(_half(p)), str(_half(p, 2)), "--o", target]
            if command == "reconstruct":
                return _reconstruct(p / P, p / T, "--o", target)
            return ["mask", "--denovo", "--box-size", "8", "--outer-radius", "3", "--o", target]

        return make

    def unwritable(p: Path, d: Path) -> list[str]:
        target = "/sys/subtomo-fuzz/out"  # root may write anywhere a mode forbids, not there
        if not _ROOT:
            (d / "ro").mkdir(mode=0o555)
            target = str(d / "ro" / "out")
        return ["mask", "--denovo", "--box-size", "8", "--outer-radius", "3", "--o", target]

    def star_print(*args: str) -> Maker:
        return lambda p, d: ["star", "print", str(p / P), *args]

    def select_empty(p: Path, d: Path) -> list[str]:
        text = (p / P).read_text()
        (d / P).write_text(text[: text.index("TS_01\tTS_01/1")])
        return ["select", "--i", str(d / P)]

    return [
        Case("cli-unknown-option", fixed("mask", "--bogus"), ("No such option: --bogus",
             "subtomo mask --help")),
        Case("cli-unknown-command", fixed("frobnicate"), ("No such command 'frobnicate'",)),
        Case("cli-not-a-number", fixed("extract", "--b", "abc"), ("--box", "valid integer")),
        Case("cli-nan-option", fixed("extract", "--bin", "nan"), ("--bin", "finite number")),
        Case("cli-inf-option", fixed("mask", "--lowpass", "inf"), ("--lowpass", "finite")),
        Case("cli-nan-star-option", lambda p, d: ["star", "recentre", "--i", str(p / P), "--o",
             str(d / "out.star"), "--center-x", "nan"], ("--center-x", "finite number")),
        Case("cli-missing-argument", lambda p, d: ["fsc", str(_half(p))],
             ("Missing argument 'map2'",)),
        Case("cli-extract-without-inputs", fixed("extract"), ("give --ios or both",)),
        Case("cli-ios-missing", lambda p, d: ["reconstruct", "--ios", str(d / "o.star")],
             ("o.star", "file not found")),
        Case("cli-ios-not-key-value", lambda p, d: ["reconstruct", "--ios", str(p / P)],
             (P, "not an optimisation set")),
        Case("cli-select-classes-text", select("--classes", "abc"),
             ("--classes", "class numbers", "'abc'")),
        Case("cli-select-classes-zero", select("--classes", "0,1"), ("--classes", ">= 1")),
        Case("cli-select-classes-absent", select("--classes", "7"),
             ("classified.star", "no particle is in classes [7]", "classes [1, 2]")),
        Case("cli-select-no-class-column", select("--classes", "1", source=P),
             (P, "column rlnClassNumber", "missing required column")),
        Case("cli-select-pmax-above-all", select("--min-pmax", "0.9"),
             ("classified.star", "no particle left at --min-pmax 0.9")),
        Case("cli-select-duplicates-negative", select("--remove-duplicates", "-1"),
             ("--remove-duplicates", "> 0")),
        Case("cli-select-empty-input", select_empty, (P, "data_particles", "no particles")),
        Case("cli-output-under-file-mask", under_file("mask"), ("file/out", "Not a directory")),
        Case("cli-output-under-file-reconstruct", under_file("reconstruct"),
             ("file/out", "Not a directory")),
        Case("cli-output-under-file-fsc", under_file("fsc"), ("/file", "File exists")),
        Case("cli-output-unwritable", unwritable,
             ("/sys/subtomo-fuzz: Operation not permitted" if _ROOT
              else "ro/out: Permission denied",)),
        Case("cli-star-print-no-block", star_print("optimiser"), (P, "no block data_optimiser")),
        Case("cli-star-print-no-column", star_print("particles", "rlnFoo"),
             (P, "column rlnFoo", "no such column")),
        Case("cli-star-combine-missing", lambda p, d: ["star", "combine", str(p / P),
             str(d / "gone.star"), "--o", str(d / "all.star")], ("gone.star", "file not found")),
        Case("cli-postprocess-no-maps", fixed("postprocess"), ("give the half maps",)),
        Case("cli-postprocess-no-half1-name", lambda p, d: ["postprocess", "--i",
             str(p / "Reconstruct/job002/merged.mrc")], ("merged.mrc", "give --i2")),
        Case("cli-localres-sampling-zero", lambda p, d: ["localres", "--i", str(_half(p)),
             "--locres-sampling", "0"], ("--locres-sampling", "positive")),
        Case("cli-mask-denovo-without-box", fixed("mask", "--denovo"), ("--box-size",)),
        Case("cli-mask-two-combinations", lambda p, d: ["mask", "--i", str(_half(p)), "--and",
             str(_half(p)), "--or", str(_half(p))], ("at most one of",)),
        Case("cli-mask-without-input", fixed("mask"), ("--i",)),
        Case("cli-class3d-k-zero", lambda p, d: ["class3d", "--ios",
             str(p / "Extract/job001/optimisation_set.star"), "--ref", str(_half(p)), "--K", "0"],
             ("--K and --iter must be >= 1",)),
        Case("cli-refine3d-without-ref", lambda p, d: ["refine3d", "--ios",
             str(p / "Extract/job001/optimisation_set.star")], ("--ref",)),
        Case("cli-simulate-bad-size", lambda p, d: ["simulate", "--out", str(d / "s"),
             "--tomogram-size", "1,2"], ("--tomogram-size", "W,H,D")),
    ]


def _mdoc_cases() -> list[tuple[str, Callable[[str], bytes | None], tuple[str, ...]]]:
    """(id, the text of a valid mdoc -> the bytes of the case (None: a directory), expect)."""

    def sub(old: str, new: str) -> Callable[[str], bytes]:
        return lambda text: text.replace(old, new, 1).encode()

    return [
        ("empty", lambda t: b"", ("no tilt images",)),
        ("nul-bytes", lambda t: b"\0" * 64, ("not a readable mdoc file",)),
        ("latin1", lambda t: t.replace("TiltAngle = 6", "TiltAngle = \xb16").encode("latin-1"),
         ("not UTF-8 text: byte 0xb1", "line")),
        ("no-sections", lambda t: b"PixelSpacing = 10\nVoltage = 300\n", ("no tilt images",)),
        ("tilt-text", sub("TiltAngle = 6\n", "TiltAngle = six\n"), ("not a readable mdoc",)),
        ("tilt-inf", sub("TiltAngle = 6\n", "TiltAngle = inf\n"), ("has no valid TiltAngle",)),
        ("pixel-negative", sub("PixelSpacing = 10", "PixelSpacing = -10"),
         ("PixelSpacing = -10, expected > 0",)),
        ("voltage-zero", sub("Voltage = 300", "Voltage = 0"), ("Voltage = 0, expected > 0",)),
        ("zvalue-twice", sub("[ZValue = 1]", "[ZValue = 0]"), ("[ZValue = 0] appears twice",)),
        ("dose-negative", sub("ExposureDose = 3", "ExposureDose = -3"), ("negative ExposureDose",)),
        ("garbage", lambda t: b"[[[ ]] = = =\n[ZValue = x]\nTiltAngle\n", ("not a readable",)),
        ("directory", lambda t: None, ("is a directory",)),
        ("valid-accepted", lambda t: t.encode(), ()),
    ]


# fmt: on
CASES = [
    *_particles_cells(),
    *_optics_cells(),
    *_particles_structure(),
    *_stacks_cases(),
    *_tomograms_cases(),
    *_tilt_image_cases(),
    *_box_cases(),
    *_map_cases(),
    *_refinement_cases(),
    *_cli_cases(),
]
MDOC_CASES = _mdoc_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_command_line_case(case: Case, project: Path, inputs: dict, capsys) -> None:
    """One malformed input through ``subtomo``: one error line (or the stated acceptance),
    no traceback, inputs unchanged."""
    _run(case, project, inputs, capsys)


@pytest.mark.parametrize("name,make,expect", MDOC_CASES, ids=[c[0] for c in MDOC_CASES])
def test_mdoc_case(name: str, make, expect: tuple[str, ...], project: Path) -> None:
    """The mdoc reader (no command reads mdocs yet): an ``InputError`` naming the file and
    the cause, in one line, or the tilt series; the file unchanged."""
    path = project / "fuzz" / f"mdoc-{name}.mdoc"
    data = make((project / "TS_01.mdoc").read_text())
    if data is None:
        path.mkdir(parents=True)
    else:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
    before = _checksums(project / "fuzz")
    if not expect:
        assert len(read_mdoc(path).tilt_angles_deg) == 21
    else:
        with pytest.raises(InputError) as info:
            read_mdoc(path)
        line = " ".join(str(info.value).split())
        assert str(path) in line and all(part in line for part in expect), line
    assert _checksums(project / "fuzz") == before


def test_corpus_size() -> None:
    """The issue asks for at least 100 malformed cases."""
    assert len(CASES) + len(MDOC_CASES) >= 100
