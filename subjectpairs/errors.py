"""Errors that reach users as one clear line instead of a traceback."""


class InputError(ValueError):
    """Bad input: names the file, the line where known, and the problem."""
