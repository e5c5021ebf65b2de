"""`make demo`: compose adapters for tasks the default bank has never seen, and measure them.

For each demo task of the default suite (kept out of the default bank), loramix reads the task's training
data, weighs the bank's adapters by how close their training data is, composes a new adapter and, as `generate`
does by default where this CPU does it within a minute, trains the composition's factors on 16 of the task's
examples (else the held-out check chooses among the composition at four scales, the top entries alone and the base
model); then it evaluates the base model and the adapter on the task's test split."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import loramix
from loramix.build import DEMO_TASKS
from loramix.data import read_dataset
from loramix.evaluate import evaluate, load_for_eval, merged_adapter
from loramix.paths import DEFAULT_SUITE

OUT = Path(__file__).resolve().parent.parent / "demo-out"
LIMIT = int(os.environ.get("DEMO_LIMIT", "40"))


def main() -> None:
    console = Console()
    console.print(f"[bold]loramix {loramix.__version__}[/bold]: adapters for unseen tasks from the default bank\n")
    bank = loramix.Bank("default")
    console.print(f"bank: {len(bank.usable)} LoRAs of {bank.base_model} (rank {bank.max_rank})")
    model, tokenizer = load_for_eval(bank.base_model)
    table = Table(title=f"ROUGE-L / exact match on each task's test split (first {LIMIT} records)")
    for col in ("task", "base", "loramix", "generate (s)", "refined / check kept", "top bank entries"):
        table.add_column(col, justify="right" if col in ("base", "loramix", "generate (s)") else "left")
    for task in DEMO_TASKS:
        folder = DEFAULT_SUITE / task
        test = read_dataset(folder / "test.jsonl")
        console.print(f"\n[bold]{task}[/bold]: {test.samples[0].input.splitlines()[0]}")
        start = time.perf_counter()
        result = loramix.generate(bank, folder / "train.jsonl", OUT / task, force=True)
        seconds = time.perf_counter() - start
        base = evaluate(test, limit=LIMIT, model=model, tokenizer=tokenizer)
        with merged_adapter(model, OUT / task):  # base weights + the composed update, restored after
            composed = evaluate(test, limit=LIMIT, model=model, tokenizer=tokenizer)
        example = test.samples[0]
        console.print(f"  input:    {example.input.splitlines()[-1]!r}  reference: {example.output!r}")
        console.print(f"  base:     {base['predictions'][0]!r}")
        console.print(f"  loramix:  {composed['predictions'][0]!r}")
        top = ", ".join(f"{name} {c:.2f}" for name, c in result.top(3) if c)
        check, tuned = result.report.check, result.report.finetune
        table.add_row(
            task,
            f"{base['rougeL']:.3f} / {base['exact_match']:.2f}",
            f"{composed['rougeL']:.3f} / {composed['exact_match']:.2f}",
            f"{seconds:.1f}",
            f"{tuned.examples} examples, {tuned.steps} steps" if tuned else check.chosen if check else "-",
            top or "- (the base model)",
        )
    console.print()
    console.print(table)
    console.print(f"\nadapters written to {OUT}/<task> (PEFT format, with loramix.json)")


if __name__ == "__main__":
    main()
