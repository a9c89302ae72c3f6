"""Developer tools: not used by the pipeline itself (a throw-away SLURM cluster for tests)."""
