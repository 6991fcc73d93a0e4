"""The root of the errors a user can fix (bad config, data, checkpoint, cluster request).

The command line prints these as one line and exits with status 2; anything else is a bug and
keeps its traceback. The base lives in its own light module so the CLI can catch every user
error without importing torch or megatron first.
"""


class UserError(Exception):
    """An error the user can fix; its message says what and where."""
