"""What the commands share: the consoles and how they print (`styled`, `_table`), the options several commands
take, and the options generated from GenerateConfig's fields (`config_options`)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Annotated, Any, Optional, Sequence

import typer
from rich.table import Table
from rich.text import Text

from ..terminal import SafeConsole
from ..config import STAGES, GenerateConfig, method_fields, flag as config_flag
from ..engine import ENGINES
from ..errors import LoramixError

# Nothing printed is read as rich markup (markup=False): paths, prompts, answers, entry names, table cells and error
# messages hold what users and bank authors wrote ('[/INST]', 'run[/]x'); styles are given as Text parts (`styled`).
out = SafeConsole(soft_wrap=True, markup=False)  # prints no control character of user or bank text (terminal.py)
err = SafeConsole(stderr=True, soft_wrap=True, markup=False)


def styled(*parts: str | tuple[str, str]) -> Text:
    """Text made of plain strings and (string, style) pairs, printed as it is."""
    return Text.assemble(*parts)


def _table(title: str, *columns: Sequence[str], edge: bool = False) -> Table:
    """A table titled `title` whose columns are the groups `columns` in order, left-justified (text) and
    right-justified (numbers) by turns: the first group left, the second right, and so on."""
    table = Table(title=title, show_edge=edge)
    for i, group in enumerate(columns):
        for col in group:
            table.add_column(col, justify="right" if i % 2 else "left")
    return table


# Options that several commands take, each defined once.
EngineOpt = Annotated[str, typer.Option("--engine", help=f"Execution engine: {', '.join(ENGINES.names())} (local: this process; ray: RAY_ADDRESS, else a local Ray cluster).")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Also read adapter_model.bin (torch.load, weights_only).")]
RuntimeOpt = Annotated[str, typer.Option("--runtime", help="What runs the base model: auto (llama.cpp for a GGUF base, else "
                                         "PyTorch), torch, llama.cpp (a GGUF base; the default base's shipped GGUF).")]
D = GenerateConfig()
MAX_ANSWER_TOKENS = 8192  # the longest answer eval and try generate: beyond the context of the bases loramix serves


def _cli_type(f: dataclasses.Field) -> Any:
    """The type typer parses a configuration field as: its own, Optional when its default is None; a field that takes
    an int or a word (rank: 'full', check: 'auto') as text, parsed by GenerateConfig."""
    hint = typing.get_type_hints(GenerateConfig)[f.name]
    if f.name in ("rank", "check", "refine"):
        return Optional[str]
    if any(typing.get_origin(a) is dict for a in typing.get_args(hint)):  # NAME=VALUE, repeatable (_pairs)
        return Optional[list[str]]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return Optional[args[0]] if args else hint


def _pairs(flag: str, items: list[str] | None) -> dict[str, float] | None:
    """NAME=VALUE options (`flag` given once per pair) as {NAME: VALUE}; VALUE a number."""
    if not items:
        return None
    pairs = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            pairs[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise LoramixError(f"{flag} {item!r}: give NAME=VALUE, VALUE a number (e.g. {flag} lr=0.01)")
    return pairs


def config_options(names: Sequence[str] | None = None, derive: Any = None):
    """Decorator: the command gains one option per GenerateConfig field (`names`, default every field), with the
    field's flag, default and help text, shown in one help panel per stage (config.STAGES, in their order), and
    receives them as `config: GenerateConfig`. `derive(fields, kwargs)`: more GenerateConfig fields, from those and
    the command's other options."""
    chosen = sorted((f for f in dataclasses.fields(GenerateConfig) if (f.name in names if names else True)),
                    key=lambda f: STAGES.index(f.metadata["stage"]))

    def wrap(fn):
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)  # resolved, Annotated options kept
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values() if p.name != "config"]
        for f in chosen:
            flag = config_flag(f.name)
            if _cli_type(f) is bool:  # a switch: --x / --no-x
                flag = f"{flag}/--no-{flag[2:]}"
            pairs = _cli_type(f) == Optional[list[str]]
            opt = typer.Option(f.default, flag, help=f.metadata["help"], metavar="NAME=VALUE" if pairs else None,
                               rich_help_panel=f"{f.metadata['stage'].capitalize()} options")
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=_cli_type(f)))

        @functools.wraps(fn)
        def command(**kwargs):
            values = {f.name: kwargs.pop(f.name) for f in chosen}
            for f in chosen:
                if _cli_type(f) == Optional[list[str]]:  # NAME=VALUE pairs
                    values[f.name] = _pairs(config_flag(f.name), values[f.name])
            config = GenerateConfig(**values, **(derive(values, kwargs) if derive else {}))
            return fn(config=config, **kwargs)

        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap


METHOD_FIELDS = [f.name for f in method_fields()]
