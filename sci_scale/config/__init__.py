"""Typed run configuration: pydantic models, YAML loading, dotted overrides, validation."""

from sci_scale.config.errors import ConfigError
from sci_scale.config.loader import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
    validate,
    validate_implementation,
)
from sci_scale.config.schema import Config

__all__ = [
    "Config",
    "ConfigError",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "save_config",
    "validate",
    "validate_implementation",
]
