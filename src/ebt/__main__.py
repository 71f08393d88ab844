"""`python -m ebt ...` (also what torchrun runs: `torchrun ... -m ebt train ...`)."""

from ebt.cli import main
from ebt.distributed import exit_process

exit_process(main())  # under torchrun: without interpreter finalization (see exit_process)
