"""The command's usage error, apart from everything that imports torch (the parser needs it)."""


class UsageError(ValueError):
    """An argument names something that does not exist or cannot be used (exit code 2)."""
