"""`python -m qatune ...` (what `torchrun -m qatune train ...` runs)."""

from .cli import main

raise SystemExit(main())
