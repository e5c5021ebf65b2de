"""The `loramix` command line: `generate`, `bank index`, `bank list`, `version`.

The root app and its callback are in app.py, the options and output helpers the commands share in options.py;
importing commands.py registers the top-level commands, and the sub-apps of bank.py, tasks.py and export.py are
added here; `main` runs the app with its error handling."""

from __future__ import annotations

import contextlib
import signal
import sys
import typing
from pathlib import Path
from typing import Any

import typer

from ..config import flag
from ..errors import LoramixError, debug_from_env
from .app import _DEBUG, app
from .bank import bank_app
from .commands import _as_utf8  # and, imported, its commands are registered on `app`
from .export import export_app
from .options import err, out, styled
from .tasks import tasks_app

__all__ = ["app", "main", "out", "_as_utf8"]

app.add_typer(bank_app, name="bank")
app.add_typer(tasks_app, name="tasks")
app.add_typer(export_app, name="export")


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM: leave as an exception does, through every clean-up (a temporary output folder is removed)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
    raise SystemExit(128 + signal.SIGTERM)


def _check_path_arguments(command: Any) -> None:
    """Every path argument and option of every command refuses, in one line, what names no file loramix can use: an
    empty string (an unset shell variable: the parser would read it as the current folder) and a path that is not
    UTF-8 text (file formats, the index's keys and llama.cpp need paths as text)."""
    from ..bank import not_utf8, unreadable

    for param in command.params:
        annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
        if Path not in (annotation, *typing.get_args(annotation)) or "process_value" in vars(param):
            continue

        def process_value(ctx: Any, value: Any, param: Any = param, process: Any = param.process_value) -> Any:
            name = param.opts[0] if param.opts and param.opts[0].startswith("-") else param.name.upper()
            for text in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(text, str) and not text.strip():
                    raise LoramixError(f"{name}: an empty path (an unset shell variable?)")
                if isinstance(text, str) and (why := not_utf8(text)) is not None:
                    raise LoramixError(f"{name} {text}: the path {unreadable(text, why, 'rename it')}")
            return process(ctx, value)

        param.process_value = process_value
    for sub in getattr(command, "commands", {}).values():
        _check_path_arguments(sub)


def main() -> None:
    """The `loramix` command: errors are one line on stderr and exit status 1 (a traceback only with --debug)."""
    _DEBUG[0] = debug_from_env()
    for stream in (sys.stdout, sys.stderr):  # a terminal that is not UTF-8 (LC_ALL=C): text it cannot show is escaped
        if not (getattr(stream, "encoding", None) or "utf-8").lower().replace("-", "").startswith("utf"):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.reconfigure(errors="backslashreplace")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # start-up is over (see loramix/__init__.py)
    signal.signal(signal.SIGTERM, _terminated)  # `kill`: cleans up as Ctrl-C does (SIGKILL's leftovers: files.clear_leftovers)
    try:
        command = typer.main.get_command(app)
        _check_path_arguments(command)
        command()
    except (LoramixError, OSError) as e:
        if _DEBUG[0]:
            raise
        # the library names settings as its API does (check_budget); here they are the options that set them
        message = e.render(flag) if isinstance(e, LoramixError) else f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
        err.print(styled(("error:", "red"), f" {' '.join(message.split())}"), highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print(styled(("interrupted", "red"), ": nothing half-written was kept"))
        sys.exit(130)
    except SystemExit as e:
        if e.code == 130:  # typer turns Ctrl-C in a command into exit status 130, silently
            err.print(styled(("interrupted", "red"), ": nothing half-written was kept"))
        elif e.code == 128 + signal.SIGTERM:
            err.print(styled(("terminated", "red"), ": nothing half-written was kept"))
        raise
    except Exception as e:  # a case no check foresaw: still one line, and the way to the traceback
        if _DEBUG[0]:
            raise
        message = " ".join(str(e).split())[:300]
        err.print(styled(("error:", "red"), f" unexpected {type(e).__name__}: {message} (a loramix bug: rerun with --debug "
                  "for the traceback, and report it)"), highlight=False, soft_wrap=True)
        sys.exit(1)
