"""The `loramix` command line: `generate`, `bank index`, `bank list`, `version`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import LoramixError
from .pipeline import GenerateConfig

app = typer.Typer(help="Compose task-specific LoRA adapters from a bank of LoRAs, on CPU.", no_args_is_help=True, add_completion=False)
bank_app = typer.Typer(help="Inspect and index a bank of adapters.", no_args_is_help=True)
app.add_typer(bank_app, name="bank")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

D = GenerateConfig()  # the defaults, in one place


def _parse_rank(value: Optional[str]) -> int | str | None:
    if value is None or value == "full":
        return value
    try:
        return int(value)
    except ValueError:
        raise LoramixError(f"--rank must be an integer or 'full', got {value!r}") from None


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
) -> None:
    if debug:
        os.environ["LORAMIX_DEBUG"] = "1"
    from rich.logging import RichHandler

    logger = logging.getLogger("loramix")
    if not logger.handlers:
        logger.addHandler(RichHandler(console=err, show_time=False, show_path=False))
    logger.setLevel(logging.INFO if verbose else logging.WARNING)


@app.command()
def generate(
    bank: Path = typer.Option(..., "--bank", "-b", help="Bank folder (subfolders: PEFT adapters with train.jsonl)."),
    data: Path = typer.Option(..., "--data", "-d", help="Your task's data: .jsonl, .json, .csv/.tsv, NI task, or save_to_disk folder."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write the new adapter to."),
    signature: str = typer.Option(D.signature, help="Dataset signature: unigram, embed, hidden."),
    distance: str = typer.Option(D.distance, help="Distance: wd, kl, js, mmd (unigram); w2, sliced, mmd-rbf, gaussian-w2 (embed, hidden)."),
    operator: str = typer.Option(D.operator, help="Meta-operator: attentional, normalized, neural."),
    compose: str = typer.Option(D.compose, help="Composition: exact (sum of updates) or paper (A and B averaged)."),
    rank: Optional[str] = typer.Option(None, help="Output rank: an integer, or 'full'. Default: the bank's largest rank."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep only the k largest coefficients."),
    temperature: float = typer.Option(D.temperature, help="Softmin temperature (larger: flatter weights)."),
    seed: int = typer.Option(D.seed, help="Seed for subsampling, sliced projections and MMD draws."),
    max_samples: int = typer.Option(D.max_samples, help="At most this many samples per dataset for signatures."),
    model: Optional[str] = typer.Option(None, help="Embedding model (embed) or base model (unigram, hidden) to use."),
    dtype: Optional[str] = typer.Option(None, help="Output dtype: float32, float16, bfloat16 (default: the bank's)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    show: int = typer.Option(5, "--show", help="How many top entries to print."),
) -> None:
    """Compose an adapter for DATA from the adapters of BANK and write it to OUT."""
    from .pipeline import generate as run

    config = GenerateConfig(
        signature=signature, distance=distance, operator=operator, compose=compose, rank=_parse_rank(rank),
        top_k=top_k, temperature=temperature, seed=seed, max_samples=max_samples, model=model, dtype=dtype,
    )
    result = run(bank, data, out_dir, config, force=force)
    table = Table(title=f"top entries of {len(result.coefficients)}", show_edge=False)
    table.add_column("bank entry")
    table.add_column("coefficient", justify="right")
    table.add_column(f"distance ({distance})", justify="right")
    for name, c in result.top(show):
        table.add_row(name, f"{c:.4f}", f"{result.distances[name]:.4g}")
    out.print(table)
    energy = result.report["energy"]
    out.print(
        f"wrote [bold]{result.out}[/bold]: rank {result.report['rank'] or 'as bank'}, "
        f"energy kept {energy['mean']:.4f} (min {energy['min']:.4f})"
    )


@bank_app.command("index")
def bank_index(
    bank: Path = typer.Argument(..., help="Bank folder."),
    signature: str = typer.Option(D.signature, help="Signature to compute: unigram, embed, hidden."),
    model: Optional[str] = typer.Option(None, help="Embedding model or base model override."),
    max_samples: int = typer.Option(D.max_samples, help="At most this many samples per entry."),
    seed: int = typer.Option(0, help="Subsampling seed."),
    distance: Optional[str] = typer.Option(None, help="Also compute the bank's distance matrix for this distance."),
    neural: bool = typer.Option(False, "--neural", help="Also fit the neural operator (needs --distance)."),
    compose: str = typer.Option(D.compose, help="Composition the neural operator is fitted for (exact or paper)."),
) -> None:
    """Compute and cache every entry's signature under BANK/.loramix/ (only what changed)."""
    from .bank import Bank
    from .index import BankIndex
    from .pipeline import fit_operator
    from .signatures import SignatureSpec

    index = BankIndex(Bank(bank))
    spec = SignatureSpec(signature, model, max_samples, seed)
    before = sum(index.status(spec).values())
    sigs = index.signatures(spec)
    out.print(f"{len(sigs)} signatures ({signature}) in {index.dir}: {len(sigs) - before} computed, {before} cached")
    if neural and distance is None:
        raise LoramixError("--neural needs --distance")
    if distance:
        matrix = index.distance_matrix(spec, distance, seed)
        out.print(f"distance matrix ({distance}): {matrix.shape[0]} x {matrix.shape[1]}")
    if neural:
        config = GenerateConfig(signature=signature, model=model, max_samples=max_samples, seed=seed,
                                distance=distance, operator="neural", compose=compose)
        op = fit_operator(index, config)
        out.print(f"neural operator fitted: reconstruction loss {op.history[0]:.6g} -> {op.history[-1]:.6g}")


@bank_app.command("list")
def bank_list(
    bank: Path = typer.Argument(..., help="Bank folder."),
    signature: str = typer.Option(D.signature, help="Signature whose cache status to show."),
    model: Optional[str] = typer.Option(None, help="Embedding model or base model override."),
    max_samples: int = typer.Option(D.max_samples, help="As given to `bank index`."),
    seed: int = typer.Option(0, help="As given to `bank index`."),
) -> None:
    """Show BANK's entries: rank, target modules, sample count and signature status."""
    from .bank import Bank
    from .index import BankIndex
    from .signatures import SignatureSpec

    b = Bank(bank)
    status = BankIndex(b).status(SignatureSpec(signature, model, max_samples, seed))
    table = Table(title=f"{b.path}  base model: {b.base_model or 'unknown'}  entries: {len(b.entries)}")
    for col in ("entry", "rank", "scale", "target modules", "samples", f"signature ({signature})"):
        table.add_column(col, justify="right" if col in ("rank", "scale", "samples") else "left")
    for e in b.entries:
        ranks = sorted({m.rank for m in e.adapter.modules.values()})
        scales = sorted({round(m.scale, 4) for m in e.adapter.modules.values()})
        samples = str(sum(1 for line in open(e.data_file, encoding="utf-8", errors="replace") if line.strip())) if e.data_file else "-"
        sig = "no data" if not e.has_data else ("cached" if status.get(e.name) else "missing")
        table.add_row(e.name, "/".join(map(str, ranks)), "/".join(f"{s:g}" for s in scales), ",".join(e.adapter.target_modules), samples, sig)
    out.print(table)


@app.command()
def version() -> None:
    """Print loramix's version."""
    from . import __version__

    out.print(__version__)


def main() -> None:
    try:
        app()
    except LoramixError as e:
        if os.environ.get("LORAMIX_DEBUG"):
            raise
        err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
