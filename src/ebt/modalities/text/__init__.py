"""Text: the next-token task, generation and reasoning probes."""
