"""The one exception loramix raises for bad inputs: its message is a single line naming what and where."""


class LoramixError(Exception):
    """A user-facing error: a one-line message naming the file, entry or field and what is wrong. Line breaks that
    a quoted name or value brings in (a tensor name, a CSV header, a path) are shown escaped, as \\n, so the
    message stays one line."""

    def __init__(self, message: str = "") -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def env_flag(name: str) -> bool | None:
    """The environment variable `name` as a switch, in any case: 1, true, yes, on -> True; 0, false, no, off or
    empty -> False; unset or anything else -> None (the default)."""
    import os

    value = os.environ.get(name)
    if value is None:
        return None
    value = value.strip().lower()
    return True if value in ("1", "true", "yes", "on") else False if value in ("0", "false", "no", "off", "") else None


def debug_from_env() -> bool:
    """Whether LORAMIX_DEBUG asks for tracebacks (env_flag; off by default)."""
    return bool(env_flag("LORAMIX_DEBUG"))


def hub_errors() -> tuple[type[BaseException], ...]:
    """What a hub request raises: HTTP errors, and the transport's own (requests' are OSErrors, httpx's are not)."""
    import sys

    from huggingface_hub.errors import HfHubHTTPError

    return (HfHubHTTPError, OSError, *(m.HTTPError for m in map(sys.modules.get, ("httpx", "httpx2")) if m))


def first_line(e: BaseException) -> str:
    """The first line of what `e` says (its type when it says nothing)."""
    return (str(e).splitlines() or [type(e).__name__])[0]
