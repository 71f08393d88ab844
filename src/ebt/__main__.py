"""`python -m ebt ...` (also what torchrun runs: `torchrun ... -m ebt train ...`).

Guarded: torch.compile's worker processes import the main module again under another name, and an
unguarded `main()` there parsed their arguments as an ebt command line.
"""

from ebt.cli.main import main
from ebt.training.distributed import exit_process

if __name__ == "__main__":
    exit_process(main())  # under torchrun: without interpreter finalization (see exit_process)
