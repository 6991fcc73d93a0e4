"""Evaluation: SCI representation metrics (more to come: SCAN/COGS generalization, perplexity)."""
