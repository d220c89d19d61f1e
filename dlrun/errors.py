"""The one exception type that reaches the user as a message instead of a traceback."""


class UserError(Exception):
    """A mistake the user can fix: the CLI prints the message and exits non-zero."""
