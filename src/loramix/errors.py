"""The one exception loramix raises for bad inputs: its message is a single line naming what and where."""


class LoramixError(Exception):
    """A user-facing error: a one-line message naming the file, entry or field and what is wrong."""
