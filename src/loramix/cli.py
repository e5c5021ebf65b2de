"""The `loramix` command line: `generate`, `bank index`, `bank list`, `version`."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import signal
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

import typer
from rich.table import Table
from rich.text import Text

from .errors import LoramixError, debug_from_env
from .terminal import SafeConsole
from .config import GenerateConfig, method_fields
from .engine import ENGINES
from .hub import COLLECTIONS, pull_base
from .train_config import BANK_TRAINING, TrainConfig, bank_config

app = typer.Typer(help="Compose task-specific LoRA adapters from a bank of LoRAs, on CPU.", no_args_is_help=True, add_completion=False)
bank_app = typer.Typer(help="Inspect and index a bank of adapters.", no_args_is_help=True)
app.add_typer(bank_app, name="bank")
# Nothing printed is read as rich markup (markup=False): paths, prompts, answers, entry names, table cells and error
# messages hold what users and bank authors wrote ('[/INST]', 'run[/]x'); styles are given as Text parts (`styled`).
out = SafeConsole(soft_wrap=True, markup=False)  # prints no control character of user or bank text (terminal.py)
err = SafeConsole(stderr=True, soft_wrap=True, markup=False)


def styled(*parts: str | tuple[str, str]) -> Text:
    """Text made of plain strings and (string, style) pairs, printed as it is."""
    return Text.assemble(*parts)

# Options that several commands take, each defined once.
EngineOpt = Annotated[str, typer.Option("--engine", help=f"Execution engine: {', '.join(ENGINES.names())} (local: this process; ray: RAY_ADDRESS, else a local Ray cluster).")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Also read adapter_model.bin (torch.load, weights_only).")]
RuntimeOpt = Annotated[str, typer.Option("--runtime", help="What runs the base model: auto (llama.cpp for a GGUF base, else "
                                         "PyTorch), torch, llama.cpp (a GGUF base; the default base's shipped GGUF).")]
SignatureOpt = Annotated[str, typer.Option("--signature", help=GenerateConfig.__dataclass_fields__["signature"].metadata["help"])]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help=GenerateConfig.__dataclass_fields__["model"].metadata["help"])]
MaxSamplesOpt = Annotated[int, typer.Option("--max-samples", min=1, help=GenerateConfig.__dataclass_fields__["max_samples"].metadata["help"])]
SeedOpt = Annotated[int, typer.Option("--seed", help=GenerateConfig.__dataclass_fields__["seed"].metadata["help"])]
D = GenerateConfig()
MAX_ANSWER_TOKENS = 8192  # the longest answer eval and try generate: beyond the context of the bases loramix serves


def _cli_type(f: dataclasses.Field) -> Any:
    """The type typer parses a configuration field as: its own, Optional when its default is None; a field that takes
    an int or a word (rank: 'full', check: 'auto') as text, parsed by GenerateConfig."""
    hint = typing.get_type_hints(GenerateConfig)[f.name]
    if f.name in ("rank", "check"):
        return Optional[str]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return Optional[args[0]] if args else hint


def config_options(names: Sequence[str] | None = None, derive: Any = None):
    """Decorator: the command gains one option per GenerateConfig field (`names`, default every method field),
    with the field's flag, default and help text, and receives them as `config: GenerateConfig`. `derive(fields,
    kwargs)`: more GenerateConfig fields, from those and the command's other options."""
    chosen = [f for f in dataclasses.fields(GenerateConfig) if (f.name in names if names else True)]

    def wrap(fn):
        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)  # resolved, Annotated options kept
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values() if p.name != "config"]
        for f in chosen:
            flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
            if _cli_type(f) is bool:  # a switch: --x / --no-x
                flag = f"{flag}/--no-{flag[2:]}"
            opt = typer.Option(f.default, flag, help=f.metadata["help"])
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=_cli_type(f)))

        @functools.wraps(fn)
        def command(**kwargs):
            values = {f.name: kwargs.pop(f.name) for f in chosen}
            config = GenerateConfig(**values, **(derive(values, kwargs) if derive else {}))
            return fn(config=config, **kwargs)

        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap


METHOD_FIELDS = [f.name for f in method_fields()]


_DEBUG = [False]  # set by --debug (or LORAMIX_DEBUG=1) for this invocation only


@app.callback()
def _main(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
) -> None:
    _DEBUG[0] = debug or debug_from_env()
    from rich.logging import RichHandler

    logger = logging.getLogger("loramix")
    if not logger.handlers:
        logger.addHandler(RichHandler(console=err, show_time=False, show_path=False))
    logger.setLevel(logging.INFO if verbose else logging.WARNING)


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
    from .pipeline import generate as run

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
    from .train import train as run

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

    from .data import Dataset, read_dataset
    from .evaluate import evaluate, write_predictions

    from .adapter import base_model_of
    from .files import refuse_target
    from .runtime import base_paths

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
    from .build import DEMO_TASKS, build_bank

    config = bank_config(steps=steps, rank=rank, save_dtype=save_dtype)
    status = build_bank(suite, out_dir, tasks=tasks, exclude=() if include_demo else DEMO_TASKS, config=config, base=base, engine=engine)
    trained = sum(1 for v in status.values() if v == "trained")
    out.print(styled("bank ", (str(out_dir), "bold"), f": {len(status)} entries, {trained} trained, {len(status) - trained} kept"))


def _index_distance(values: dict, kwargs: dict) -> dict:
    """`bank index`'s distance: --distance when given, else (no distance is computed) the default, or the first
    distance for the kind of --signature where the default compares another (`--signature unigram` alone)."""
    if kwargs.get("distance"):
        return {"distance": kwargs["distance"]}
    from .distances import DISTANCES
    from .signatures import SIGNATURES

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
    from .bank import Bank
    from .index import BankIndex
    from .meta import operator_for
    from .operators import trainable_operator

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
    mode, probes = index.mode(config.entry_signatures), config.probe_set()
    if mode != "data":
        probed = index.probe_signatures(spec, probes, engine=engine, base_name=base, runtime=runtime)
        out.print(f"{len(probed)} probe-answer signatures ({config.signature}, {len(probes.prompts)} prompts, "
                  f"{config.probes or 'the default probes'}) in {index.dir}")
    if distance:
        matrix = index.distance_matrix(spec, distance, config.seed, mode, probes, base_name=base, runtime=runtime)
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
    from .bank import Bank
    from .calibrate import calibrate

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
    from .pipeline import leave_one_out

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
    from .hub import add_adapter

    out.print(styled("added ", (str(add_adapter(bank, source, data, name=name, force=force)), "bold")))


@bank_app.command("list")
def bank_list(
    bank: Path = typer.Argument(..., help="Bank folder."),
    signature: SignatureOpt = D.signature,
    model: ModelOpt = None,
    max_samples: MaxSamplesOpt = D.max_samples,
    seed: SeedOpt = D.seed,
    allow_pickle: PickleOpt = False,
) -> None:
    """Show BANK's entries: rank, target modules, sample count and signature status."""
    from .bank import Bank
    from .index import BankIndex
    from .signatures import SignatureSpec

    b = Bank(bank, allow_pickle=allow_pickle)
    status = BankIndex(b).status(SignatureSpec(signature, model, max_samples, seed))
    table = _table(f"{b.path}  base model: {b.base_model or 'unknown'}  entries: {len(b.entries)}", ["entry"],
                   ["rank", "scale"], ["target modules"], ["samples"], [f"signature ({signature})"], edge=True)
    for e in b.entries:
        ranks = sorted({m.rank for m in e.adapter.modules.values()})
        scales = sorted({round(m.scale, 4) for m in e.adapter.modules.values()})
        sig = "no data" if not e.has_data else ("cached" if status.get(e.name) else "missing")
        samples = "-" if e.samples is None else str(e.samples)
        table.add_row(e.name, "/".join(map(str, ranks)), "/".join(f"{s:g}" for s in scales), ",".join(e.adapter.target_modules), samples, sig)
    out.print(table)


def _table(title: str, *columns: Sequence[str], edge: bool = False) -> Table:
    """A table titled `title` whose columns are the groups `columns` in order, left-justified (text) and
    right-justified (numbers) by turns: the first group left, the second right, and so on."""
    table = Table(title=title, show_edge=edge)
    for i, group in enumerate(columns):
        for col in group:
            table.add_column(col, justify="right" if i % 2 else "left")
    return table


tasks_app = typer.Typer(help="Build the task suite (one bank LoRA per task) from real data installed offline.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")


@tasks_app.command("build")
def tasks_build(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write the suite to (one subfolder per task)."),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Build only this task (repeatable)."),
    seed: int = typer.Option(0, help="Seed for sampling, shuffling and splitting."),
) -> None:
    """Build every task whose sources are installed (or those named with --only) into OUT."""
    from .tasks import build_suite

    report = build_suite(out_dir, only=only, seed=seed)
    table = _table(f"{out_dir}: {len(report.built)} tasks built, {len(report.skipped)} skipped", ["task", "family"],
                   ["train", "valid", "test"])
    for e in report.built:
        table.add_row(e["name"], e["family"], *(str(e["counts"][s]) for s in ("train", "valid", "test")))
    out.print(table)  # skipped tasks were logged as warnings
    if only and report.skipped:
        raise LoramixError(f"could not build {'; '.join(report.skipped.values())}")


@tasks_app.command("list")
def tasks_list() -> None:
    """Show the registered tasks: family, definition, and whether their sources are installed."""
    from .tasks import SUITE, TASKS

    table = _table(f"{len(SUITE)} tasks", ["task", "family", "definition", "sources"])
    for name in SUITE:
        spec = TASKS.get(name)
        missing = spec.missing()
        table.add_row(name, spec.family, spec.definition, Text("; ".join(missing), style="red") if missing else "installed")
    out.print(table)


export_app = typer.Typer(help="Export an adapter for llama.cpp (GGUF) or as a merged model.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("gguf")
def export_gguf_cmd(
    adapter: Path = typer.Option(..., "--adapter", "-a", help="PEFT adapter folder."),
    out_file: Path = typer.Option(..., "--out", "-o", help="GGUF file to write."),
    base: Optional[str] = typer.Option(None, help="Base model whose config.json to read (default: the adapter's own)."),
    dtype: str = typer.Option("f32", help="Tensor type: f32 or f16."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    allow_pickle: PickleOpt = False,
) -> None:
    """Write ADAPTER as a GGUF LoRA adapter for llama.cpp (llama-cli --lora FILE) and Ollama (ADAPTER FILE)."""
    from .export import export_gguf

    path = export_gguf(adapter, out_file, base=base, dtype=dtype, allow_pickle=allow_pickle, force=force)
    out.print(styled("wrote ", (str(path), "bold"), f" ({path.stat().st_size / 2**20:.1f} MiB)"))


@export_app.command("merged")
def export_merged_cmd(
    adapter: Path = typer.Option(..., "--adapter", "-a", help="PEFT adapter folder."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write the merged model to."),
    base: Optional[str] = typer.Option(None, help="Base model (default: the adapter's own)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Merge ADAPTER into its base model and save a safetensors model that transformers loads without PEFT."""
    from .export import export_merged

    out.print(styled("wrote ", (str(export_merged(adapter, out_dir, base=base, force=force)), "bold")))


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
    from .evaluate import answer_streams

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
    from .version import __version__

    out.print(__version__)


def _terminated(signum: int, frame: Any) -> None:
    """SIGTERM: leave as an exception does, through every clean-up (a temporary output folder is removed)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
    raise SystemExit(128 + signal.SIGTERM)


def _check_path_arguments(command: Any) -> None:
    """Every path argument and option of every command refuses, in one line, what names no file loramix can use: an
    empty string (an unset shell variable: the parser would read it as the current folder) and a path that is not
    UTF-8 text (file formats, the index's keys and llama.cpp need paths as text)."""
    from .bank import not_utf8, unreadable

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
        message = str(e) if isinstance(e, LoramixError) else f"{e.strerror or e}: {e.filename or ''}".rstrip(": ")
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
