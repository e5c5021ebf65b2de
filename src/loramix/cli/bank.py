"""`loramix bank`: build, index, calibrate, leave-one-out, pull, add and list the entries of a bank of adapters."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from ..errors import LoramixError
from ..config import GenerateConfig
from ..hub import COLLECTIONS, pull_base
from ..train_config import BANK_TRAINING, bank_config
from .options import (D, METHOD_FIELDS, EngineOpt, PickleOpt, RuntimeOpt,
                      _table, config_options, out, styled)

bank_app = typer.Typer(help="Inspect and index a bank of adapters.", no_args_is_help=True)


@bank_app.command("build")
def bank_build(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Bank folder to write (resumable)."),
    suite: str = typer.Option("default", help="'default' (the suite shipped with loramix) or a `tasks build` folder."),
    tasks: Optional[list[str]] = typer.Option(None, "--task", help="Only these tasks (repeatable)."),
    include_demo: bool = typer.Option(False, "--include-demo", help="Also train the demo tasks kept out of the default bank."),
    base: Optional[str] = typer.Option(None, help="Base model (default SmolLM2-135M-Instruct)."),
    steps: int = typer.Option(BANK_TRAINING.steps, help="Optimizer steps per adapter."),
    rank: int = typer.Option(BANK_TRAINING.rank, help="LoRA rank."),
    save_dtype: str = typer.Option(BANK_TRAINING.save_dtype, help="dtype of the saved weights."),
    engine: EngineOpt = "local",
) -> None:
    """Train one adapter per suite task into OUT, each with its train.jsonl: a bank `generate` can use."""
    from ..build import DEMO_TASKS, build_bank

    config = bank_config(steps=steps, rank=rank, save_dtype=save_dtype)
    status = build_bank(suite, out_dir, tasks=tasks, exclude=() if include_demo else DEMO_TASKS, config=config, base=base, engine=engine)
    trained = sum(1 for v in status.values() if v == "trained")
    out.print(styled("bank ", (str(out_dir), "bold"), f": {len(status)} entries, {trained} trained, {len(status) - trained} kept"))


def _index_distance(values: dict, kwargs: dict) -> dict:
    """`bank index`'s distance: --distance when given, else (no distance is computed) the default, or the first
    distance for the kind of --signature where the default compares another (`--signature unigram` alone)."""
    if kwargs.get("distance"):
        return {"distance": kwargs["distance"]}
    from ..distances import DISTANCES
    from ..signatures import SIGNATURES

    kind = SIGNATURES.get(values["signature"]).kind
    return {} if DISTANCES.get(D.distance).kind == kind else {
        "distance": next(n for n in DISTANCES.names() if DISTANCES.get(n).kind == kind)}


@bank_app.command("index")
@config_options(["signature", "model", "max_samples", "seed", "entry_signatures", "probes"], derive=_index_distance)
def bank_index(
    bank: Path = typer.Argument(..., help="Bank folder."),
    distance: Optional[str] = typer.Option(None, help="Also compute the bank's distance matrix for this distance."),
    fit: Optional[str] = typer.Option(None, "--fit", help="Also fit this trainable operator (neural: the paper's, on "
                                      "the adapters; neural-answer: on the bank's own answer loss, loads the base "
                                      "model, minutes); needs --distance."),
    compose: str = typer.Option(D.compose, help="Composition the operator is fitted for (exact or paper)."),
    engine: EngineOpt = "local",
    allow_pickle: PickleOpt = False,
    base: Optional[str] = typer.Option(None, help="Base model the probe prompts are answered on (default: the bank's); "
                                       "a GGUF file runs on llama.cpp. With --engine ray, each worker loads it once."),
    runtime: RuntimeOpt = "auto",
    config: GenerateConfig = D,
) -> None:
    """Compute and cache every entry's signature under BANK/.loramix/ (only what changed): from its train.jsonl, and
    for the entries signed by their probe answers (--entry-signatures) from those, running the base model once."""
    from ..bank import Bank
    from ..index import BankIndex
    from ..bank_operator import operator_for
    from ..operators import trainable_operator

    if fit and distance is None:
        raise LoramixError("--fit needs --distance")
    if fit:
        trainable_operator(fit)
    if distance:  # checked before any work
        config = dataclasses.replace(config, distance=distance, compose=compose, operator=fit or config.operator)
    index = BankIndex(Bank(bank, allow_pickle=allow_pickle))
    if distance and not index.bank.usable:
        raise LoramixError("--distance needs entries with data: the bank's distance matrix has a row per entry's dataset")
    spec = config.signature_spec()
    before = sum(index.status(spec).values())
    sigs = index.signatures(spec, engine=engine)
    out.print(f"{len(sigs)} signatures ({config.signature}) in {index.dir}: {len(sigs) - before} computed, {before} cached")
    probes = config.probe_set()
    if index.mode(config.entry_signatures).probes:
        probed = index.probe_signatures(spec, probes, engine=engine, base_name=base, runtime=runtime)
        out.print(f"{len(probed)} probe-answer signatures ({config.signature}, {len(probes.prompts)} prompts, "
                  f"{config.probes or 'the default probes'}) in {index.dir}")
    if distance:
        matrix = index.distance_matrix(spec, distance, config.seed, config.entry_signatures, probes, base_name=base,
                                       runtime=runtime)
        out.print(f"distance matrix ({distance}): {matrix.shape[0]} x {matrix.shape[1]}")
    if fit:
        op = operator_for(index, config)
        out.print(f"operator {fit} fitted: loss {op.history[0]:.6g} -> {op.history[-1]:.6g} over {len(op.history)} epochs")


@bank_app.command("calibrate")
@config_options(["signature", "distance", "operator", "compose", "max_samples", "model", "seed"])
def bank_calibrate(
    bank: Path = typer.Argument(..., help="Bank folder."),
    examples: int = typer.Option(8, "--examples", min=1, max=4096, help="Training samples of each held-out entry scored."),
    force: bool = typer.Option(False, "--force", help="Compute again even if cached."),
    allow_pickle: PickleOpt = False,
    config: GenerateConfig = D,
) -> None:
    """Choose the temperature, top-k and scale of the composed update by the bank's own leave-one-out answer loss
    (forward passes of the base model only); `generate` then uses them for this setting."""
    from ..bank import Bank
    from ..calibrate import calibrate

    cal = calibrate(Bank(bank, allow_pickle=allow_pickle), config, examples=examples, force=force)
    r = cal.ratios()
    best = cal.candidates.index(cal.best)
    default = next(i for i, c in enumerate(cal.candidates) if (c.temperature, c.top_k, c.scale) == (1.0, None, 1.0))
    out.print(f"calibrated on {len(cal.entries)} entries x {cal.examples} examples ({cal.seconds:.0f} CPU s): temperature "
              f"{cal.best.temperature:g}, top-k {cal.best.top_k or 'all'}, scale {cal.best.scale:g}; leave-one-out answer loss "
              f"{r[:, best].mean():.3f} x the base model's (uncalibrated {r[:, default].mean():.3f}); "
              f"worse than the base on {int((r[:, best] > 1).sum())} entries (uncalibrated {int((r[:, default] > 1).sum())})")


@bank_app.command("loo")
@config_options(METHOD_FIELDS)
def bank_loo(
    bank: Path = typer.Argument(..., help="Bank folder."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write one predicted adapter per entry into."),
    force: bool = typer.Option(False, "--force", help="Replace existing outputs."),
    allow_pickle: PickleOpt = False,
    config: GenerateConfig = D,
) -> None:
    """Leave-one-out: predict every entry's adapter from the others, in one pass over the bank's tensors."""
    from ..pipeline import leave_one_out

    c = leave_one_out(bank, out_dir, config, force=force, allow_pickle=allow_pickle)
    out.print(styled(f"wrote {len(c)} leave-one-out adapters to ", (str(out_dir), "bold")))


@bank_app.command("pull")
def bank_pull(
    collection: Optional[str] = typer.Argument(None, help=f"The collection to pull: {', '.join(COLLECTIONS.names())} "
                                               "(or --base)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Bank folder to write (resumable)."),
    base: Optional[str] = typer.Option(None, "--base", help="Pull instead the public LoRA adapters of this base model "
                                       "(a hub model id): the hub's listing, most downloaded first (offline: those in "
                                       "the local hub cache, by id), without training data."),
    limit: Optional[int] = typer.Option(None, min=1, help="At most this many tasks (in task-number order) or, with "
                                        "--base, adapters (after --filter)."),
    tasks: Optional[list[str]] = typer.Option(None, "--task", help="Only these tasks, e.g. task081 or 81 (repeatable)."),
    filters: Optional[list[str]] = typer.Option(None, "--filter", help="With --base: only adapters whose repository id "
                                                "contains this text, in any case (repeatable: all must match)."),
) -> None:
    """Download a collection's adapters and the train split of each one's dataset into a bank, or (--base) the
    public LoRA adapters of a base model."""
    if (collection is None) == (base is None):
        raise LoramixError(f"bank pull takes a COLLECTION or --base MODEL_ID{', not both' if collection else ''}")
    if filters and base is None:
        raise LoramixError("--filter needs --base")
    if tasks and base is not None:
        raise LoramixError("--task needs a COLLECTION, not --base")
    if base is not None:
        status = pull_base(out_dir, base, limit=limit, filters=filters)
    else:
        status = COLLECTIONS.get(collection)(out_dir, limit=limit, tasks=tasks)
    counts = {kind: sum(1 for v in status.values() if v.split(":")[0] == kind) for kind in ("pulled", "kept", "refused")}
    out.print(styled("bank ", (str(out_dir), "bold"), f": {counts['pulled'] + counts['kept']} entries, {counts['pulled']} pulled, "
                     f"{counts['kept']} kept, {counts['refused']} refused"))


@bank_app.command("add")
def bank_add(
    bank: Path = typer.Argument(..., help="Bank folder (created if missing)."),
    source: str = typer.Argument(..., help="A PEFT adapter folder or a hub model id."),
    data: Path = typer.Option(..., "--data", "-d", help="The data the adapter was trained on (any format loramix reads)."),
    name: Optional[str] = typer.Option(None, help="Entry name (default: the folder's or repository's name)."),
    force: bool = typer.Option(False, "--force", help="Replace an entry of the same name."),
) -> None:
    """Add an adapter and its training data to BANK, refusing anything that would make the bank invalid."""
    from ..hub import add_adapter

    out.print(styled("added ", (str(add_adapter(bank, source, data, name=name, force=force)), "bold")))


@bank_app.command("list")
@config_options(["signature", "model", "max_samples", "seed"])
def bank_list(
    config: GenerateConfig,
    bank: Path = typer.Argument(..., help="Bank folder."),
    allow_pickle: PickleOpt = False,
) -> None:
    """Show BANK's entries: rank, target modules, sample count and signature status."""
    from ..bank import Bank
    from ..index import BankIndex

    b = Bank(bank, allow_pickle=allow_pickle)
    status = BankIndex(b).status(config.signature_spec())
    signature = config.signature
    table = _table(f"{b.path}  base model: {b.base_model or 'unknown'}  entries: {len(b.entries)}", ["entry"],
                   ["rank", "scale"], ["target modules"], ["samples"], [f"signature ({signature})"], edge=True)
    for e in b.entries:
        ranks = sorted({m.rank for m in e.adapter.modules.values()})
        scales = sorted({round(m.scale, 4) for m in e.adapter.modules.values()})
        sig = "no data" if not e.has_data else ("cached" if status.get(e.name) else "missing")
        samples = "-" if e.samples is None else str(e.samples)
        table.add_row(e.name, "/".join(map(str, ranks)), "/".join(f"{s:g}" for s in scales), ",".join(e.adapter.target_modules), samples, sig)
    out.print(table)
