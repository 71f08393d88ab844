"""Video: the next-frame task, thinking about frames, rollout, figures."""
