"""`python -m ebt ...` (also what torchrun runs: `torchrun ... -m ebt train ...`)."""

import sys

from ebt.cli import main

sys.exit(main())
