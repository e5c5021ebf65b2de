"""The one exception loramix raises for bad inputs: its message is a single line naming what and where."""


class LoramixError(Exception):
    """A user-facing error: a one-line message naming the file, entry or field and what is wrong. Line breaks that
    a quoted name or value brings in (a tensor name, a CSV header, a path) are shown escaped, as \\n, so the
    message stays one line."""

    def __init__(self, message: str = "") -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def debug_from_env() -> bool:
    """Whether LORAMIX_DEBUG asks for tracebacks: only 1, true or yes (any case); 0, false, no or empty do not."""
    import os

    return os.environ.get("LORAMIX_DEBUG", "").strip().lower() in ("1", "true", "yes")
