"""ARCHITECTURE.md's example job works as written: its dataclass becomes a command whose help
shows each option with its unit and default, and the command writes the job directory."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import torch

from subtomo.cli.build import job_command
from subtomo.io import read_mrc, read_star, write_mrc

DOC = Path(__file__).resolve().parents[1] / "ARCHITECTURE.md"


def _example(tmp_path: Path, monkeypatch):
    """The doc's example job module, imported from a file."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    (source,) = [b for b in blocks if "def run(" in b]
    path = tmp_path / "lowpass_example.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("lowpass_example", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses resolve names there
    spec.loader.exec_module(module)
    return module


def test_the_example_job_runs_from_its_command(tmp_path, monkeypatch, capsys) -> None:
    module = _example(tmp_path, monkeypatch)
    command = job_command("lowpass", "Low-pass filter a map.", module.LowpassParams,
                          lambda: module.run)  # fmt: skip
    command.main(["--help"], prog_name="lowpass", standalone_mode=False)
    text = capsys.readouterr().out
    assert "<float Å>" in text and "[default: 20.0]" in text and "--o" in text
    monkeypatch.chdir(tmp_path)
    write_mrc("map.mrc", torch.randn(16, 16, 16), 5.0)
    command.main(["--i", "map.mrc", "--lowpass", "15", "--device", "cpu"],
                 prog_name="lowpass", standalone_mode=False)  # fmt: skip
    assert capsys.readouterr().out.split() == ["LowPass/job001/lowpass.mrc"]
    filtered, px = read_mrc("LowPass/job001/lowpass.mrc")
    assert filtered.shape == (16, 16, 16) and px == 5.0
    options = read_star("LowPass/job001/job.star")["joboptions_values"]
    assert dict(zip(options["rlnJobOptionVariable"], options["rlnJobOptionValue"],
                    strict=True))["lowpass"] == "15.0"  # fmt: skip
    assert Path("LowPass/job001/report.html").is_file()
