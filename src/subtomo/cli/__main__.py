"""``python -m subtomo.cli`` is the ``subtomo`` command (e.g. ``torchrun -m subtomo.cli``)."""

from subtomo.cli.main import main

main()
