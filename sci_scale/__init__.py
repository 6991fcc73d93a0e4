"""sci-scale: megatron-core GPT pretraining with a structural (SCI) encoder branch and SCL."""

import warnings

# The one source of the version: pyproject.toml reads this literal statically at build time
# (setuptools' attr:), so it stays a plain string assignment.
__version__ = "0.1.0"

# megatron-core warns at import when neither Transformer Engine nor Apex is present and falls
# back to torch implementations; sci-scale logs its own one-line choice of layer spec instead.
warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message=r".*Apex is not installed.*")
# megatron-core's own default for cuda_graph_scope trips its deprecation warning in 0.16.
warnings.filterwarnings("ignore", message=r"full scope is deprecated")
