"""Evaluation: SCI representation metrics, held-out perplexity, SCAN/COGS exact match, the
structural probe, and the suite that runs them on a checkpoint."""
