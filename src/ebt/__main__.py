"""`python -m ebt ...` (also what torchrun runs: `torchrun ... -m ebt train ...`).

Guarded: torch.compile's worker processes import the main module again under another name, and an
unguarded `main()` there parsed their arguments as an ebt command line.
"""

import sys

from ebt.cli import main

if __name__ == "__main__":
    sys.exit(main())
