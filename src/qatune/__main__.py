"""`python -m qatune ...` (what `torchrun -m qatune train ...` runs)."""

from qatune.cli.commands import main

raise SystemExit(main())
