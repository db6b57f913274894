"""One exception type for user-facing problems: the CLI prints it as one line and exits non-zero."""


class SegSDEError(Exception):
    """A problem with the user's input, stated with its fix (``"<what is wrong>: <what to do>"``)."""
