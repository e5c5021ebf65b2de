"""The one exception loramix raises for bad inputs: its message is a single line naming what and where."""

import logging
import re
from typing import Any, Callable

_SETTING = re.compile("\x1f([A-Za-z_][A-Za-z0-9_]*)(?:\x1e([^\x1f]*))?\x1f")
_UNSET = object()


def setting(name: str, value: Any = _UNSET) -> str:
    """A setting named in an error message, with an optional value: the library's message reads `name` (`name=value`),
    the CLI's the option that sets it (`--name value`, a switch without its value True: `LoramixError.render`)."""
    return f"\x1f{name}\x1f" if value is _UNSET else f"\x1f{name}\x1e{value}\x1f"


def named(text: str, name_of: Callable[[str], str] = str, between: str = "=") -> str:
    """`text` with each `setting` in it named by `name_of(setting)`, a value joined by `between` (a switch's True left
    out where `between` is not '='): the library's own terms by default."""
    def one(m: re.Match) -> str:
        shown = m[2] is not None and not (m[2] == "True" and between != "=")
        return name_of(m[1]) + (between + m[2] if shown else "")

    return _SETTING.sub(one, text)


class SettingNames(logging.Filter):
    """Names the settings in the "loramix" logger's records (`named`): in the library's terms, unless an interface
    sets `name_of` and `between` (the CLI: its flags)."""

    name_of: Callable[[str], str] = str
    between = "="

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\x1f" in message:
            record.msg, record.args = named(message, self.name_of, self.between), None
        return True


SETTING_NAMES = SettingNames()
logging.getLogger("loramix").addFilter(SETTING_NAMES)


class LoramixError(Exception):
    """A user-facing error: a one-line message naming the file, entry or field and what is wrong. Line breaks that
    a quoted name or value brings in (a tensor name, a CSV header, a path) are shown escaped, as \\n, so the
    message stays one line. Settings are named in the library's terms (`setting`); `render` names them as another
    interface (the CLI's flags) does."""

    def __init__(self, message: str = "") -> None:
        self.template = str(message).replace("\r", "\\r").replace("\n", "\\n")
        super().__init__(named(self.template))

    def render(self, name_of: Callable[[str], str], between: str = " ") -> str:
        """The message with each setting named by `name_of(setting)`, a value joined by `between` (`named`)."""
        return named(self.template, name_of, between)


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
