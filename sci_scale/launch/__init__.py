"""Launching runs on clusters: Slurm batch scripts, submission, and run status."""
