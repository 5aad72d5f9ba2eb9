"""Run several ``subtomo`` command lines one after the other in each rank of one ``torchrun``
launch (tests: one process-group start-up for many jobs). Exits at the first failure."""

from __future__ import annotations

import shlex
import sys

from subtomo.cli.main import run_cli

if __name__ == "__main__":
    for line in sys.argv[1:]:
        if code := run_cli(shlex.split(line)):
            sys.exit(code)
