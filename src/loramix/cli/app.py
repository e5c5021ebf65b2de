"""The root `loramix` app and its callback (--debug, --verbose); the commands register on it from their modules."""

from __future__ import annotations

import logging

import typer

from ..config import flag
from ..errors import SETTING_NAMES, debug_from_env
from .options import err

app = typer.Typer(help="Compose task-specific LoRA adapters from a bank of LoRAs, on CPU.", no_args_is_help=True, add_completion=False)
_DEBUG = [False]  # set by --debug (or LORAMIX_DEBUG=1) for this invocation only


@app.callback()
def _main(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
) -> None:
    _DEBUG[0] = debug or debug_from_env()
    from rich.logging import RichHandler

    logger = logging.getLogger("loramix")
    if not logger.handlers:
        logger.addHandler(RichHandler(console=err, show_time=False, show_path=False))
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    SETTING_NAMES.name_of, SETTING_NAMES.between = flag, " "  # warnings name the options that set what they say
    ctx.call_on_close(lambda: setattr(SETTING_NAMES, "name_of", str) or setattr(SETTING_NAMES, "between", "="))
