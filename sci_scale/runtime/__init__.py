"""sci-scale."""
