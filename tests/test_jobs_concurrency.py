"""Jobs started at once in one project, and jobs whose process was killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from subtomo.cli.main import run_cli
from subtomo.project import KILLED, PROCESS, job_status, read_pipeline

# Each process imports everything first, says it is ready, then waits for the file "go", so
# that all jobs reach their registration together; then it runs the real entry point.
_WAIT_THEN_RUN = """
import os, pathlib, time
import subtomo.jobs.mask
from subtomo.cli.main import main
pathlib.Path(f"ready.{os.getpid()}").touch()
while not pathlib.Path("go").exists():
    time.sleep(0.002)
main()
"""


def _statuses(project: Path) -> dict[str, str]:
    procs = read_pipeline(project)["pipeline_processes"]
    return dict(
        zip(procs["rlnPipeLineProcessName"], procs["rlnPipeLineProcessStatusLabel"], strict=True)
    )


def test_jobs_started_together_get_their_own_folder_entry_and_status(tmp_path: Path) -> None:
    """Five mask jobs released at the same moment in one project: five job folders, five
    pipeline entries, each Succeeded. Without the pipeline lock two jobs take one number (one
    folder, one entry), or one job's read-modify-write of default_pipeline.star loses
    another's entry or leaves a finished job "Running"."""
    n = 5
    argv = ["mask", "--denovo", "--box-size", "8", "--outer-radius", "3", "--device", "cpu"]
    command = [sys.executable, "-c", _WAIT_THEN_RUN, *argv]
    procs = [
        subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(n)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready.*"))) < n:
        assert time.monotonic() < deadline, "the jobs did not start"
        time.sleep(0.01)
    (tmp_path / "go").touch()
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    folders = sorted(tmp_path.glob("MaskCreate/job*"))
    assert [f.name for f in folders] == [f"job{k:03d}" for k in range(1, n + 1)]
    for folder in folders:
        assert (folder / "RELION_JOB_EXIT_SUCCESS").is_file() and (folder / "mask.mrc").is_file()
    assert _statuses(tmp_path) == {f"MaskCreate/{f.name}/": "Succeeded" for f in folders}
    assert int(read_pipeline(tmp_path)["pipeline_general"]["rlnPipeLineJobCounter"]) == n + 1


_SLEEPING_JOB = """
import time
from subtomo.project import run_job
with run_job("Sleep", {"seconds": 120}, project_dir="."):
    time.sleep(120)
"""


def test_killed_job_shows_as_failed_killed(tmp_path: Path, capsys) -> None:
    """A job SIGKILLed mid-run leaves no exit marker and stays "Running" in the pipeline;
    ``subtomo jobs`` must show it as "Failed (killed?)" (it showed "Running" forever), while
    the same job alive shows "Running"."""
    proc = subprocess.Popen([sys.executable, "-c", _SLEEPING_JOB], cwd=tmp_path)
    try:
        record = tmp_path / "Sleep/job001" / PROCESS
        deadline = time.monotonic() + 120
        while not (record.is_file() and (tmp_path / "default_pipeline.star").is_file()):
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not start"
            time.sleep(0.05)
        assert run_cli(["jobs", "--project", str(tmp_path)]) == 0
        assert "Running" in capsys.readouterr().out
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _statuses(tmp_path) == {"Sleep/job001/": "Running"}
    assert not any((tmp_path / "Sleep/job001").glob("RELION_JOB_EXIT_*"))
    assert run_cli(["jobs", "--project", str(tmp_path)]) == 0
    assert "killed?" in capsys.readouterr().out


def test_job_status_judges_the_recorded_process(tmp_path: Path) -> None:
    """A job recorded as Running stays so while its process lives (this one), or when it ran
    on another host (cannot be checked from here); a recorded PID now used by a newer
    process (another start time) means the job's own process is gone."""
    job = tmp_path / "Refine3D/job001"
    job.mkdir(parents=True)
    start = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    host = socket.gethostname()
    name = "Refine3D/job001/"
    for record, expected in (
        (f"{os.getpid()} {host} {start}", "Running"),
        (f"{os.getpid()} other-host {start}", "Running"),
        (f"{os.getpid()} {host} 1", KILLED),
    ):
        (job / PROCESS).write_text(record + "\n")
        assert job_status(tmp_path, name, "Running") == expected, record
    assert job_status(tmp_path, name, "Succeeded") == "Succeeded"
    (job / "RELION_JOB_EXIT_SUCCESS").touch()  # finishing: marker written, pipeline not yet
    assert job_status(tmp_path, name, "Running") == "Running"
