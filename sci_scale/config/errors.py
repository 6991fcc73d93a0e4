"""The configuration error, in a module of its own so that any layer can raise it without
importing the loader (and the loader's YAML and schema machinery)."""

from sci_scale.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem, stated in one line: the key, the value and what is valid."""
