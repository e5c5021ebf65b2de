"""The top-level commands: `generate`, `train`, `eval`, `try`, `version`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..config import GenerateConfig
from ..train_config import TrainConfig
from .app import app
from .options import D, MAX_ANSWER_TOKENS, PickleOpt, RuntimeOpt, _table, config_options, err, out, styled


@app.command()
@config_options()
def generate(
    bank: Path = typer.Option(..., "--bank", "-b", help="Bank folder (subfolders: PEFT adapters with train.jsonl)."),
    data: Path = typer.Option(..., "--data", "-d", help="Your task's data: .jsonl, .json, .csv/.tsv, NI task, or save_to_disk folder."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write the new adapter to."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    show: int = typer.Option(5, "--show", min=0, max=10_000, help="How many top entries to print."),
    allow_pickle: PickleOpt = False,
    config: GenerateConfig = D,
) -> None:
    """Compose an adapter for DATA from the adapters of BANK and write it to OUT."""
    from ..pipeline import generate as run

    result = run(bank, data, out_dir, config, force=force, allow_pickle=allow_pickle)
    table = _table(f"top entries of {len(result.coefficients)}", ["bank entry"],
                   ["coefficient", f"distance ({config.distance})"])
    for name, c in result.top(show):
        table.add_row(name, f"{c:.4f}", f"{result.distances[name]:.4g}")
    out.print(table)
    report = result.report
    kept = f", energy kept {report.energy.mean:.4f} (min {report.energy.min:.4f})" if report.energy.mean is not None else ""
    if (cal := report.calibration) is not None:
        out.print(f"using the bank's calibration ({cal.entries} entries, leave-one-out loss {cal.loss_ratio:.3f} x the base "
                  f"model's): temperature {cal.temperature:g}, top-k {cal.top_k or 'all'}, scale {cal.scale:g}")
    if (r := report.refine) is not None:
        out.print(f"refined on {r.examples} examples ({r.method}, {r.steps} steps, {r.seconds:.1f} s): "
                  f"loss {r.initial_loss:.4f} -> {r.loss:.4f}")
    if (chk := report.check) is not None:
        shown = {"loss": "answer loss", "accuracy": "token accuracy", "rouge": "ROUGE-L"}
        shown = {m: label for m, label in shown.items() if all(m in v for v in chk.candidates.values())}
        scores = ", ".join(f"{k} " + "/".join(f"{v[m]:.3f}" for m in shown) for k, v in chk.candidates.items())
        out.print(f"checked on {chk.examples} held-out examples ({' / '.join(shown.values())}: {scores}): kept "
                  f"{chk.chosen} (by {chk.criterion})")
        if not chk.beats_base:
            then = ("the adapter written has a zero update (the base model)" if report.finetune is None else
                    "--refine trained a fresh LoRA instead")
            err.print(styled(("warning:", "yellow"), f" no composition beat the base model on the held-out examples: {then}"))
    if report.refine_plan is not None and report.refine_plan.startswith("not"):
        out.print(f"refine auto: {report.refine_plan}")
    if (ft := report.finetune) is not None:
        start = "the composition" if ft.from_composition else "a fresh LoRA (the check kept the base)"
        out.print(f"fine-tuned from {start} on {ft.examples} examples ({ft.steps} steps, {ft.seconds:.1f} s): "
                  f"training loss {ft.first_loss:.4f} -> {ft.loss:.4f}")
    out.print(styled("wrote ", (str(result.out), "bold"), f": rank {report.rank or 'as bank'}{kept}"))


@app.command()
def train(
    data: Path = typer.Option(..., "--data", "-d", help="Training data (input/output records)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write the trained adapter to."),
    base: Optional[str] = typer.Option(None, help="Base model: 'default' (SmolLM2-135M-Instruct), a hub id or a path."),
    steps: int = typer.Option(TrainConfig.steps, help="Optimizer steps."),
    batch_size: int = typer.Option(TrainConfig.batch_size, help="Samples per step."),
    lr: float = typer.Option(TrainConfig.lr, help="Peak learning rate (AdamW, warmup then cosine decay)."),
    rank: int = typer.Option(TrainConfig.rank, help="LoRA rank."),
    alpha: int = typer.Option(TrainConfig.alpha, help="LoRA alpha."),
    target_modules: str = typer.Option("q_proj,k_proj,v_proj", help="Comma-separated module names to adapt."),
    seed: int = typer.Option(TrainConfig.seed, help="Seed for initialisation and batch order."),
    save_dtype: str = typer.Option(TrainConfig.save_dtype, help="dtype of the saved weights: float32, float16, bfloat16."),
    budget: Optional[float] = typer.Option(None, help="Stop within this many seconds (the schedule shortened to fit)."),
    max_tokens: Optional[int] = typer.Option(None, help="Run at most this many token positions (the steps cut to the "
                                             "first that fit, the shared prompt prefix counted once; deterministic)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Fine-tune a LoRA on DATA the ordinary way (gradients): the upper bound, and how banks are built."""
    from ..train import train as run

    config = TrainConfig(
        steps=steps, batch_size=batch_size, lr=lr, rank=rank, alpha=alpha, seed=seed, save_dtype=save_dtype,
        target_modules=[m.strip() for m in target_modules.split(",") if m.strip()], budget=budget,
        max_tokens=max_tokens,
    )
    record = run(data, out_dir, config, base=base, force=force)
    losses = record["loss"]
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10) :]
    mean = lambda xs: f"{sum(xs) / len(xs):.3f}" if xs else "-"  # noqa: E731
    out.print(styled(
        "wrote ", (str(out_dir), "bold"), f": {len(losses)} steps in {record['seconds']:.0f} s on {record['device']}, "
        f"loss {mean(head)} -> {mean(tail)}"
    ))


@app.command("eval")
def eval_(
    data: Path = typer.Option(..., "--data", "-d", help="Evaluation data (a test split; references in 'output')."),
    adapter: Optional[Path] = typer.Option(None, help="PEFT adapter folder; without it the base model is evaluated."),
    base: Optional[str] = typer.Option(None, help="Base model (default: the adapter's own, else SmolLM2-135M-Instruct)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Evaluate only the first N records."),
    batch_size: int = typer.Option(32, min=1, max=4096, help="Prompts generated together."),
    max_new_tokens: int = typer.Option(48, min=1, max=MAX_ANSWER_TOKENS, help="Longest answer generated (tokens)."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (rougeL, exact_match, contains, n, ...)."),
    predictions: Optional[Path] = typer.Option(None, help="Also write each input, prediction and references as JSONL here."),
    runtime: RuntimeOpt = "auto",
    allow_pickle: PickleOpt = False,
) -> None:
    """Greedy generation on DATA, scored with ROUGE-L, exact match and containment (best over references)."""
    import json

    from ..data import Dataset, read_dataset
    from ..evaluate import evaluate, write_predictions

    from ..adapter import base_model_of
    from ..files import refuse_target
    from ..runtime import base_paths

    if predictions is not None:  # replaced if it exists, unless it is what this command reads
        base_model = base if base is not None else base_model_of(adapter) if adapter is not None else None
        refuse_target(predictions, force=True, folder=False, inputs={"the data": data, "the adapter": adapter,
                                                                    "the base model": base_paths(base_model)})
    dataset = read_dataset(data, split="test")  # a save_to_disk DatasetDict's test split, as evaluate() reads it
    dataset = Dataset(dataset.samples[:limit], dataset.source, dataset.definition)  # the records predicted
    result = evaluate(dataset, base=base, adapter=adapter, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      runtime=runtime, allow_pickle=allow_pickle)
    preds = result.pop("predictions")
    if predictions is not None:
        write_predictions(predictions, dataset, preds)
    if json_out:
        print(json.dumps(result))
        return
    table = _table(f"{data} ({result['n']} records, {result['seconds']:.0f} s)", ["model"],
                   ["ROUGE-L", "exact match", "contains"])
    table.add_row(str(adapter or "base"), f"{result['rougeL']:.4f}", f"{result['exact_match']:.4f}", f"{result['contains']:.4f}")
    out.print(table)


@app.command("try")
def try_(
    adapter: Path = typer.Option(..., "--adapter", "-a", help="PEFT adapter folder."),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="Prompt (repeatable); none: read prompts interactively."),
    base: Optional[str] = typer.Option(None, help="Base model (default: the adapter's own); a GGUF file runs on llama.cpp."),
    max_new_tokens: int = typer.Option(64, min=1, max=MAX_ANSWER_TOKENS, help="Longest answer (tokens)."),
    runtime: RuntimeOpt = "auto",
    allow_pickle: PickleOpt = False,
) -> None:
    """Answer prompts with the base model and with base + ADAPTER, one after the other, streaming the tokens."""
    from ..evaluate import answer_streams

    prompt = [_as_utf8(text, sys.getfilesystemencoding()) for text in prompt or []]  # argv, decoded as file names are
    with answer_streams(adapter, base, runtime, max_new_tokens, allow_pickle=allow_pickle) as stream:
        def answer(text: str) -> None:
            for label in ("base", "adapter"):
                out.print(styled((f"{label}:", "bold"), " "), end="")
                for piece in stream(text, label == "adapter"):
                    out.print(piece, end="", highlight=False)
                out.print()

        if prompt:
            for text in prompt:
                out.print(f"> {text}", style="dim", highlight=False)
                answer(text)
            return
        out.print("type a prompt (empty line or Ctrl-D to quit)", style="dim")
        while sys.stdin is not None:  # None: started with standard input closed (<&-), nothing to read
            try:
                text = _as_utf8(input("> "), getattr(sys.stdin, "encoding", None) or "utf-8")
            except EOFError:
                break
            if not text.strip():
                break
            answer(text)


def _as_utf8(text: str, encoding: str) -> str:
    """`text` as the UTF-8 text its bytes are, where Python decoded them as `encoding` (argv and stdin in a C / POSIX
    locale without UTF-8 mode: each non-ASCII byte a lone surrogate); bytes that are not UTF-8 are left as they were
    read (and refused as no text: prompts.prompt_ids)."""
    try:
        return text.encode(encoding, "surrogateescape").decode("utf-8")
    except (UnicodeError, LookupError):
        return text


@app.command()
def version() -> None:
    """Print loramix's version."""
    from ..version import __version__

    out.print(__version__)
