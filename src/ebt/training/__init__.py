"""Training plumbing: trainer, objective, optimiser, replay, run directory, interrupts,
tracking, distributed, evaluation, bench."""
