"""The command line is built from the jobs' parameter dataclasses (options declared once, in
``subtomo.project.options`` fields): every flag spelling of before still parses, an option
left out is the dataclass default (a ``--continue`` keeps the stored values), ``--help``
shows units and defaults, and listing commands imports no job module (no torch)."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys

import pytest
import typer
from typer._click import Context

from subtomo.cli.build import CommandGroup, JobCommand, option_name
from subtomo.cli.commands import COMMANDS
from subtomo.cli.main import app, run_cli
from subtomo.project.options import option, options_of

#: Every flag each command took before its options moved into the dataclasses (the README,
#: scripts and the tests use them). New spellings may be added; none may go.
FLAGS_BEFORE = {
    "jobs": "--project",
    "select": "--i --classes --min-pmax --min-loglike --remove-duplicates --tomograms "
    "--random-halves --seed --o",
    "extract": "--ios --particles --p --tomograms --t --trajectories --mot --box --b --crop --bin "
    "--stack2d --3d --float16 --float32 --max_dose --min_frames --apply_offsets "
    "--dont_apply_offsets --apply_orientations --cone_weight --cone_angle --cone_sig0 --no_ctf "
    "--no_ic --no_circle_crop --batch --device --o",
    "reconstruct": "--ios --particles --p --tomograms --t --trajectories --mot --box --b --crop "
    "--bin --sym --SNR --taper --no_ctf --no_circle_crop --cutoff_fract --from --batch --device "
    "--o",
    "simulate": "--out --preset --map --species-fraction --tomograms --particles --pixel-size "
    "--box --tomogram-size --tilt-range --tilt-step --tilt-axis --dose-per-tilt "
    "--dose-symmetric --sequential --voltage --cs --q0 --defocus-um --defocus-spread-um "
    "--astigmatism-um --ctf --no-ctf --noise --snr --mtf --layout --tilt-error-deg "
    "--tilt-shift-error-px --pose-error-deg --shift-error-px --seed --batch --device",
    "mask": "--i --lowpass --angpix --ini-threshold --ini_threshold --extend --extend_inimask "
    "--soft-edge --width_soft_edge --invert --and --or --and-not --and_not --or-not --or_not "
    "--denovo --box-size --box_size --inner-radius --inner_radius --outer-radius --outer_radius "
    "--height --center-x --center_x --center-y --center_y --center-z --center_z --device --o",
    "postprocess": "--i --i2 --ios --mask --angpix --auto-bfac --auto_bfac --no-auto-bfac "
    "--autob-lowres --autob_lowres --autob-highres --autob_highres --adhoc-bfac --adhoc_bfac "
    "--mtf --mtf-angpix --mtf_angpix --skip-fsc-weighting --skip_fsc_weighting --low-pass "
    "--low_pass --randomize-at-fsc --randomize_at_fsc --randomize-at-A --randomize_at_A "
    "--force-mask --force_mask --filter-edge-width --filter_edge_width --interpolate "
    "--half-maps --half_maps --random-seed --random_seed --device --o",
    "localres": "--i --i2 --ios --mask --angpix --locres-sampling --locres_sampling "
    "--locres-maskrad --locres_maskrad --locres-edgwidth --locres_edgwidth "
    "--locres-randomize-at --locres_randomize_at --locres-minres --locres_minres --adhoc-bfac "
    "--adhoc_bfac --batch --random-seed --random_seed --device --o",
    "fsc": "--mask --angpix --o --device",
    "refine3d": "--ios --particles --i --tomograms --t --ref --ref_correct_greyscale --ini_high "
    "--solvent_mask --solvent_correct_fsc --sym --particle_diameter --zero_mask --no_zero_mask "
    "--tau2_fudge --healpix_order --offset_range --offset_step --auto_local_healpix_order "
    "--oversampling --sigma_ang --sigma_tilt --sigma_psi --auto_ignore_angles "
    "--auto_resol_angles --low_resol_join_halves --strict_highres_exp --iter --pad "
    "--random_seed --memory-gb --device --continue --o",
    "class3d": "--ios --particles --p --tomograms --t --trajectories --mot --ref "
    "--ref_correct_greyscale --ini_high --solvent_mask --K --classes --iter --tau2_fudge "
    "--tau2-fudge --particle_diameter --zero_mask --flatten_solvent --no_flatten_solvent --sym "
    "--skip_align --no-align --healpix_order --offset_range --offset_step --sigma_ang "
    "--oversampling --strict_highres_exp --adaptive_fraction --pad --random_seed --continue "
    "--memory-gb --cache-gb --device --o",
    "demo": "--out --quick --map --pose-error-deg --shift-error-px --align --no-align --seed "
    "--device --verbose",
    "star recentre": "--i --o --center-x --center-y --center-z",
    "star apply-orientations": "--i --o --tomograms",
    "star convert": "--i --tomograms --o",
    "star combine": "--o --tomograms",
    "star print": "",
}


def _command(path: str):
    """The built click command of ``subtomo <path>`` (loading it as running it would)."""
    command = typer.main.get_command(app)
    ctx = Context(command)
    for name in path.split():
        _, command, _ = command.resolve_command(ctx, [name])
    return command


def _job_commands() -> list[tuple[str, JobCommand]]:
    found = []
    for name, entry in COMMANDS.items():
        if isinstance(entry, CommandGroup):
            found += [(f"{name} {sub}", e) for sub, e in entry.commands.items()]
        elif isinstance(entry, JobCommand):
            found.append((name, entry))
    return found


@pytest.mark.parametrize("path", sorted(FLAGS_BEFORE))
def test_every_flag_spelling_still_works(path: str) -> None:
    """Each spelling is declared, or its other form (``-`` for ``_``: names match alike)."""
    params = _command(path).params
    flags = {flag for p in params for flag in (*p.opts, *getattr(p, "secondary_opts", ()))}
    known = {option_name(f) for f in flags}
    assert {f for f in FLAGS_BEFORE[path].split() if option_name(f) not in known} == set()


def test_hyphens_and_underscores_are_alike(monkeypatch) -> None:
    """``--ini-high`` is ``--ini_high``, ``--no-zero-mask`` is ``--no_zero_mask``; declared
    aliases (``--p``) still work."""
    seen = _capture(monkeypatch, COMMANDS["refine3d"])
    run_cli(["refine3d", "--ini-high", "30", "--no-zero-mask", "--random-seed", "4"])
    run_cli(["refine3d", "--ini_high", "30", "--no_zero_mask", "--random_seed", "4", "--i", "p"])
    assert [(p.ini_high, p.zero_mask, p.random_seed) for p in seen] == [(30.0, False, 4)] * 2
    assert seen[1].particles == "p"


def test_each_option_is_a_field_of_the_job_parameters() -> None:
    """A job command has exactly the option fields of its dataclass, with their flags: no
    option is declared anywhere else."""
    for path, entry in _job_commands():
        params_type = getattr(importlib.import_module(entry.module), entry.params)
        declared = {f.name: meta.flags for f, meta in options_of(params_type)}
        built = {p.name: tuple(p.opts) for p in _command(path).params if p.name != "help"}
        for name, flags in declared.items():
            spellings = [s for flag in flags for s in flag.split("/")] or [name]
            assert set(built[name]) <= set(spellings), (path, name)
        assert set(built) == set(declared), path


class _Captured(Exception):
    """Raised by a job's stand-in run after recording its parameters."""


def _capture(monkeypatch, entry: JobCommand) -> list:
    seen: list = []

    def run(params, **kwargs):
        seen.append(params)
        raise _Captured

    monkeypatch.setattr(f"{entry.module}.{entry.run}", run)
    return seen


@pytest.mark.parametrize("path", [p for p, _ in _job_commands()])
def test_an_option_left_out_is_the_dataclass_default(monkeypatch, capsys, path: str) -> None:
    """The command line passes only the options given: what it builds from the required
    ones alone equals the dataclass built from them in Python."""
    entry = dict(_job_commands())[path]
    params_type = getattr(importlib.import_module(entry.module), entry.params)
    required = [
        f.name
        for f in dataclasses.fields(params_type)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    argv = path.split()
    for f, meta in options_of(params_type):
        if f.name in required:
            argv += ["x.star"] if meta.is_argument else [meta.flags[0], "x.star"]
    seen = _capture(monkeypatch, entry)
    assert run_cli(argv) == 1
    assert "_Captured" in capsys.readouterr().err
    (params,) = seen
    assert params == params_type(**{name: getattr(params, name) for name in required})


def test_continue_from_the_command_line_keeps_the_stored_options(monkeypatch) -> None:
    """``class3d --continue DIR`` left --iter, --memory-gb, --cache-gb and --device unset
    (the stored values apply, subtomo.project.resolve_options); it passed --iter 25 before."""
    seen = _capture(monkeypatch, COMMANDS["class3d"])
    run_cli(["class3d", "--continue", "Class3D/job003"])
    run_cli(["class3d", "--continue", "Class3D/job003", "--iter", "30"])
    assert [p.iter for p in seen] == [None, 30]
    assert (seen[0].memory_gb, seen[0].cache_gb, seen[0].device) == (None, None, None)
    seen = _capture(monkeypatch, COMMANDS["refine3d"])
    run_cli(["refine3d", "--continue", "Refine3D/job004"])
    assert (seen[0].max_iter, seen[0].memory_gb, seen[0].device) == (None, None, None)


def test_help_shows_units_and_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        app(["refine3d", "--help"], prog_name="subtomo")
    text = capsys.readouterr().out
    ini_high = next(line for line in text.splitlines() if "--ini_high" in line)
    assert "<float Å>" in ini_high and "[default: 60.0]" in text
    assert "--particles,--i" in text and "--zero_mask" in text and "--no_zero_mask" in text


def test_a_parse_error_names_the_option(capsys) -> None:
    """A field's ``parse`` raising ValueError is a usage error naming the option."""
    assert run_cli(["simulate", "--out", "x", "--tomogram-size", "1,a,2"]) == 2
    err = capsys.readouterr().err
    assert "--tomogram-size" in err and "W,H,D" in err


def test_listing_the_commands_imports_no_job_module(tmp_path) -> None:
    """``subtomo --help``, ``subtomo star --help`` and ``subtomo jobs`` load no job module,
    so neither torch: a command is built (its module imported) only when it runs or shows
    its own help."""
    code = (
        "import sys\n"
        "from subtomo.cli.main import run_cli\n"
        "for argv in (['--help'], ['star', '--help'], ['jobs', '--project', sys.argv[1]]):\n"
        "    assert run_cli(argv) == 0, argv\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('subtomo.jobs.'))\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_an_option_needs_a_flag() -> None:
    with pytest.raises(ValueError, match="at least one flag"):
        option(1.0, help="no flag")
