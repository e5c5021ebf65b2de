"""Leave-one-out quality benchmark (`make bench-quality`): for every bank task, predict its adapter from the
other entries with each setting, evaluate it on the task's test split, and write benchmarks/results/quality.md.

Settings: the base model; the task's own trained adapter (upper bound); the uniform average of the others;
the paper's (unigram x {wd, kl, js, mmd} x {attentional, normalized, neural}, paper composition); and
loramix's (embed / hidden x {w2, sliced, mmd-rbf, gaussian-w2} x operators, exact composition, with and
without top-k). The neural operator is fitted by 5-fold cross-fitting: a task's own fold never trains it.

The headline settings (base, trained, uniform, the paper's 12, generate's default and, with --refine, LoraHub
and refinement) run on every task; the rest of the grid on one task in every `--every` (all by default).

Per-task results are cached under .cache/bench-quality/ so an interrupted run resumes."""

from __future__ import annotations

import argparse
from functools import partial
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

os.environ.setdefault("LORAMIX_PROGRESS", "0")

import loramix  # noqa: E402
from loramix import Bank, BankIndex, GenerateConfig, compose, save_adapter  # noqa: E402
from loramix.engine import RayEngine, get_engine  # noqa: E402
from loramix.files import atomic_write_bytes  # noqa: E402
from loramix.data import read_dataset  # noqa: E402
from loramix.evaluate import load_for_eval, merged_adapter  # noqa: E402
from loramix.runtime.pytorch import generate_answers  # noqa: E402
from loramix.runtime.scores import score  # noqa: E402
from loramix.bank_operator import loo_coefficients  # noqa: E402
from loramix.runtime.scores import CRITERIA  # noqa: E402
from loramix.operators import OPERATORS  # noqa: E402
from loramix.paths import resolve_suite  # noqa: E402
from loramix.probes import MAX_NEW_TOKENS, ProbeSet  # noqa: E402
from loramix.train_config import REFINE_TRAINING  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "benchmarks" / "results"))
CACHE = Path(os.environ.get("BENCH_CACHE", ROOT / ".cache" / "bench-quality"))


@dataclass(frozen=True)
class Setting:
    """One way to predict a task's adapter from the rest of the bank."""

    name: str
    group: str  # reference | paper | loramix
    signature: str | None = None
    distance: str | None = None
    operator: str | None = None
    compose: str = "exact"
    top_k: int | None = None
    temperature: float = 1.0
    warm_start: str | None = None  # refine group: the setting whose coefficients are refined ('lorahub': none)
    shots: int = 0  # training examples put in the prompt (in-context learning)
    calibrated: bool = False  # temperature, top-k and scale from the bank's calibration (cross-fitted: 5 folds)
    checked: bool = False  # the scale (0: the base) of lowest answer loss on 16 of the task's training examples
    check_singles: int = 0  # checked: the top entries alone among the candidates
    check_tops: int = 0  # checked: the composition kept to its top 2..N entries among the candidates
    check_criterion: str = "loss"  # checked: how candidates are ranked (loramix.runtime.scores.CRITERIA)
    check_examples: int = 16  # checked: the training examples the check scores candidates on
    keep_exact: float | None = None  # finetune: checked on its own training examples first; the candidate kept untrained
    # when it reproduces at least this fraction of them exactly (teacher-forced), else the composition trained
    check_after: bool = False  # finetune: the trained adapter joins the check's candidates, on examples it did not see
    examples: int = 5  # refine group: labelled training examples the search (or the equal-compute LoRA) sees
    per_layer: bool = False  # refine group: one weight per layer and entry
    budget: float | None = None  # refine group: seconds the search may take (None: LoraHub's time on 5 examples)
    finetune: bool = False  # refine group: the warm start's composed adapter trained (LoRA factors), not its weights searched
    lr: float | None = None  # finetune: the learning rate (None: the bank's training settings')
    warmup: int | None = None  # finetune: the warmup steps (None: the bank's training settings')
    steps: int | None = None  # finetune: the optimizer steps (None: the bank's training settings')
    batch_size: int | None = None  # finetune: samples per step (None: the bank's training settings')
    max_tokens: int | None = None  # finetune: token positions training may run at most (None: no limit)
    entry_signatures: str = "data"  # 'probes': every entry signed by its answers to the probe prompts, its data hidden


def settings(top_k: int, quick: bool) -> list[Setting]:
    out = [Setting("base", "reference"), Setting("trained", "reference"), Setting("uniform", "reference")]
    ops = ["attentional", "normalized", "neural"]
    for d in ["wd", "kl", "js", "mmd"]:
        for op in ops:
            out.append(Setting(f"paper/unigram-{d}-{op}", "paper", "unigram", d, op, "paper"))
    for sig in ["embed", "hidden"]:
        for d in ["w2", "sliced", "mmd-rbf", "gaussian-w2"]:
            for op in ops:
                for k in (None, top_k):
                    out.append(loramix_setting(sig, d, op, k))
    default = default_setting()
    if default.name not in {s.name for s in out}:
        out.append(default)
    if quick:
        keep = {"base", "trained", "uniform", "paper/unigram-kl-attentional", composition_setting().name, default.name}
        out = [s for s in out if s.name in keep]
    return out


def loramix_setting(sig: str, distance: str, operator: str, top_k: int | None = None, temperature: float = 1.0) -> Setting:
    name = f"loramix/{sig}-{distance}-{operator}" + (f"-top{top_k}" if top_k else "") + (f"-T{temperature:g}" if temperature != 1 else "")
    return Setting(name, "loramix", sig, distance, operator, "exact", top_k, temperature)


def composition_setting() -> Setting:
    """The meta-operator part of `loramix generate`'s default, unchecked (`--check 0`)."""
    d = GenerateConfig()
    return loramix_setting(d.signature, d.distance, d.operator, d.top_k, d.temperature)


CRITERION_SUFFIX = {"loss": "", "accuracy": "-acc", "exact": "-exact", "rouge": "-rouge", "rouge-tolerant": "-rouge-tol"}


def checked(s: Setting, singles: int, criterion: str, group: str = "lever", tops: int = 0, examples: int = 16) -> Setting:
    """`s` with the held-out check (`--check <examples> --check-singles <singles> --check-tops <tops> --check-criterion
    <criterion>`)."""
    name = (s.name + "-checked" + (f"{examples}" if examples != 16 else "") + (f"-singles{singles}" if singles else "")
            + (f"-tops{tops}" if tops else "") + CRITERION_SUFFIX[criterion])
    return replace(s, name=name, group=group, checked=True, check_singles=singles, check_tops=tops,
                   check_criterion=criterion, check_examples=examples)


def default_setting() -> Setting:
    """The setting `loramix generate` uses by default (on the default base, where `--refine auto` fits its budget:
    the composition trained on 16 examples, as `generate --refine 16`)."""
    d = GenerateConfig()
    comp = composition_setting()
    if d.refine_examples:
        return generate_refine_setting(comp)
    return checked(comp, d.check_singles, d.check_criterion, "loramix", d.check_tops) if d.check_examples else comp


def previous_default() -> Setting:
    """generate's default before `--refine auto` (issue 40): the composition checked on 16 examples by ROUGE-L."""
    return checked(composition_setting(), 4, "rouge", "loramix")


def generate_refine_setting(comp: Setting) -> Setting:
    """`generate --refine 16` (train_config.REFINE_TRAINING) from the composition `comp`."""
    tail = comp.name.split("/", 1)[1]
    return Setting(GENERATE_REFINE.format(tail=tail), "refine", signature=comp.signature, distance=comp.distance,
                   operator=comp.operator, compose="exact", top_k=comp.top_k, temperature=comp.temperature,
                   warm_start=comp.name, examples=16, finetune=True, warmup=REFINE_TRAINING.warmup,
                   steps=REFINE_TRAINING.steps, max_tokens=REFINE_TRAINING.max_tokens)


def lever_settings(comp: Setting, default: Setting) -> list[Setting]:
    """The levers beyond the meta-operator (issue 14) on the default's composition `comp` (`embed-io`): the held-out
    check's candidates (scales only, the top entries alone, the top-k restrictions) and criteria, the same checks
    with the `embed` signature (loss and accuracy), the bank calibration (unchecked and with the default's check), and in-context
    learning with the base and with the default adapter."""
    plain, io = (loramix_setting(sig, comp.distance, comp.operator, comp.top_k, comp.temperature) for sig in ("embed", "embed-io"))
    plain, io = replace(plain, group="lever"), replace(io, group="lever")
    answer = replace(io, name=io.name.replace(f"-{comp.operator}", "-neural-answer"), operator="neural-answer")
    tail = default.name.split("/", 1)[1]
    pools = ((0, 0), (4, 0), (4, CHECK_TOPS), (CHECK_SINGLES, 0), (CHECK_SINGLES, CHECK_TOPS))  # (singles, tops)
    return [
        replace(io, name=f"{io.name}-calibrated", calibrated=True),
        replace(default, name=default.name.replace("-checked", "-calibrated-checked"), group="lever", calibrated=True),
        *(checked(io, k, crit, tops=t) for k, t in pools for crit in CRITERION_SUFFIX if not CRITERIA.get(crit).generates or k <= 4),
        *(checked(io, 4, crit, examples=32) for crit in ("accuracy", "exact")),
        *(checked(plain, k, crit) for k in (0, 4, CHECK_SINGLES) for crit in ("loss", "accuracy")),
        plain,
        io,
        answer,
        checked(answer, default.check_singles, default.check_criterion, tops=default.check_tops),
        Setting("icl/base-5shot", "icl", shots=5),
        Setting("icl/base-16shot", "icl", shots=16),
        *(replace(default, name=f"icl/{tail}-{k}shot", group="icl", shots=k) for k in (5, 16)),
    ]


def datafree_settings(comp: Setting, default: Setting) -> list[Setting]:
    """The default and its composition (unchecked) with every bank entry's data hidden: entries signed by their greedy
    answers to the shipped probe prompts (`generate --entry-signatures probes`); the held-out task's own data still
    makes its signature (and the default's check), as a user's dataset does."""
    return [replace(s, name=f"{s.name}-probes", group="datafree", entry_signatures="probes") for s in (comp, default)]


def refine_settings(default: Setting) -> list[Setting]:
    """LoraHub's recipe and loramix's refinement of the default setting on 5 labelled examples; weight searches on 16
    (one weight per entry, per layer; `generate --refine 16 --refine-method gradient --budget 36 --check 16`: per
    layer, then the check by token accuracy on examples the refinement did not see); the composition's own LoRA factors trained
    on 16 examples (a grid of steps and learning rates with 2 warmup steps, `generate --refine 16` among them, and the
    bank's recipe under time budgets); and the equal-compute baseline: a LoRA trained from scratch on the same 16
    examples for as long as `generate --refine 16` took on the task."""
    tail = default.name.split("/", 1)[1]
    base = dict(signature=default.signature, distance=default.distance, operator=default.operator, compose="exact",
                top_k=default.top_k, temperature=default.temperature, warm_start=default.name)
    return [
        Setting("refine/lorahub", "refine", compose="paper", warm_start="lorahub"),
        Setting(f"refine/{tail}-refine5", "refine", **base),
        Setting(f"refine/{tail}-refine16", "refine", **base, examples=16, budget=60.0),
        Setting(f"refine/{tail}-refine16-layers", "refine", **base, examples=16, per_layer=True, budget=60.0),
        Setting(f"refine/{tail}-refine16-layers-budget{REFINE_BUDGET:g}-checked", "refine", **base, examples=16,
                per_layer=True, budget=REFINE_BUDGET,
                checked=True, **REFINE_CHECK),
        Setting(f"refine/{tail}-finetune16", "refine", **base, examples=16, budget=55.0, finetune=True),
        Setting(f"refine/{tail}-finetune16-budget48", "refine", **base, examples=16, budget=48.0, finetune=True),
        Setting(f"refine/{tail}-finetune16-budget48-warmup2", "refine", **base, examples=16, budget=48.0, finetune=True,
                warmup=2),
        Setting(f"refine/{tail}-finetune16-budget48-warmup2-lr4e-3", "refine", **base, examples=16, budget=48.0,
                finetune=True, warmup=2, lr=4e-3),
        Setting(f"refine/{tail}-checked-finetune16", "refine", **base, examples=16, budget=55.0, finetune=True,
                checked=True, **REFINE_CHECK),
        *(Setting(f"refine/{tail}-finetune16-steps{n}-warmup2" + (f"-lr{lr:g}" if lr != BANK_LR else ""), "refine", **base,
                  examples=16, finetune=True, lr=lr, warmup=2, steps=n) for n, lr in FINETUNE_GRID),
        *(Setting(f"refine/{tail}-finetune16-steps{n}-warmup2-batch4", "refine", **base, examples=16, finetune=True,
                  warmup=2, steps=n, batch_size=4) for n in (10, 20)),
        *(Setting(f"refine/{tail}-keep-exact{k:g}-finetune16-steps{REFINE_TRAINING.steps}-warmup2", "refine", **base,
                  examples=16, finetune=True, warmup=2, steps=REFINE_TRAINING.steps, keep_exact=k,
                  **REFINE_CHECK) for k in KEEP_EXACT),
        *([generate_refine_setting(default)] if REFINE_TRAINING.max_tokens else []),
        *(Setting(FINETUNE16.format(tail=tail) + f"-then-checked-singles4{CRITERION_SUFFIX[crit]}",
                  "refine", **base, examples=16, finetune=True, warmup=2, steps=REFINE_TRAINING.steps, checked=True,
                  check_after=True, check_singles=4, check_criterion=crit) for crit in ("accuracy", "exact")),
        Setting(EQUAL_COMPUTE, "refine", examples=16, warm_start=GENERATE_REFINE.format(tail=tail)),
    ]


EQUAL_COMPUTE = "refine/lora-from-scratch-equal-time"
# `generate --refine 16 --refine-method gradient --budget 36 --check 16`: per-layer refinement for at most 36 s, then
# the check by token accuracy (about 22 CPU-s on one thread), under 60 CPU-s in all
REFINE_BUDGET = 36.0
# `generate --refine 16`: the composition's LoRA factors trained on 16 examples (train_config.REFINE_TRAINING), one
# of the grid of steps and learning rates (warmup 2) it was chosen from
BANK_LR = 2e-3
FINETUNE_GRID = ((10, BANK_LR), (16, BANK_LR), (24, BANK_LR), (10, 4e-3))
FINETUNE16 = "refine/{tail}-finetune16-steps%d-warmup%d" % (REFINE_TRAINING.steps, REFINE_TRAINING.warmup) + (
    "-lr%g" % REFINE_TRAINING.lr if REFINE_TRAINING.lr != BANK_LR else "")  # the grid point, no token limit
GENERATE_REFINE = FINETUNE16 + ("-tokens%d" % REFINE_TRAINING.max_tokens if REFINE_TRAINING.max_tokens else "")
# the check of the refine rows whose names do not say it (generate's default when they were measured)
REFINE_CHECK = dict(check_singles=4, check_criterion="accuracy")
KEEP_EXACT = (0.0, 0.75, 1.0)  # keep-exact settings' thresholds (0: the checked candidate, never trained)
CHECK_SINGLES = 8  # the most entries alone any checked setting tries
CHECK_TOPS = 3  # the most top-k restrictions any checked setting tries
PREVIOUS_DEFAULT = "loramix/embed-gaussian-w2-normalized"  # generate's default before issue 14 (no check)


class Runner:
    def __init__(self, bank: str | Path, suite: Path, limit: int | None, max_samples: int, protocol: str = "loo"):
        self.bank = Bank(bank)
        # "loo": a task predicted from every other entry; "lofo": from the entries of the other families only (the
        # check's and refinement's candidates drawn from that bank too)
        self.protocol = protocol
        self.groups = family_of(suite) if protocol == "lofo" else None
        if protocol == "lofo" and not self.groups:
            raise SystemExit(f"--protocol lofo needs the suite's families ({suite}/suite.json)")
        self.index = BankIndex(self.bank)
        self.entries = self.bank.usable
        self.tasks = [e.name for e in self.entries]  # evaluated by headline settings; coefficients always use every entry
        self.grid_tasks = self.tasks  # evaluated by the other settings (all, or a subset)
        self.headline: set[str] = set()  # names of the headline settings
        self.names = [e.name for e in self.entries]
        self.suite = suite
        self.limit = limit
        self.max_samples = max_samples
        self.model = None
        self.tokenizer = None
        self.timings: dict[str, dict[str, float]] = {}
        self.longest: dict[str, int] = {}

    # -- coefficients -----------------------------------------------------------------------------------
    def coefficient_matrix(self, s: Setting) -> np.ndarray:
        """C[t] = coefficients predicting task t from the others (C[t, t] = 0; with lofo, 0 on t's family), [n, n]."""
        if s.name == "uniform":
            others = ~self.excluded()
            return others / others.sum(1, keepdims=True)
        if s.calibrated:
            return self.calibrated_matrix(s)
        config = GenerateConfig(signature=s.signature, distance=s.distance, operator=s.operator, compose=s.compose,
                                top_k=s.top_k, temperature=s.temperature, max_samples=self.max_samples,
                                entry_signatures=s.entry_signatures)
        spec = self.index.resolve(config.signature_spec())
        probe_answers = {}
        if s.entry_signatures != "data":  # once per bank: every entry answers the probe prompts (the base model run)
            start, cpu = time.perf_counter(), time.process_time()
            self.index.probe_datasets(config.probe_set())
            probe_answers = {"probe_answers_wall": time.perf_counter() - start, "probe_answers": time.process_time() - cpu}
        start = time.perf_counter()
        self.index.signatures(spec)
        if s.entry_signatures != "data":
            self.index.probe_signatures(spec, config.probe_set())
        t_sig = time.perf_counter() - start
        self.index.distance_matrix(spec, s.distance, 0, s.entry_signatures, config.probe_set())
        t_dist = time.perf_counter() - start - t_sig
        trainable = OPERATORS.get(s.operator).trainable
        mode = f".{s.entry_signatures}" if s.entry_signatures != "data" else ""
        memo = self.bank_root / "coefficients" / f"{s.signature}.{s.distance}.{s.operator}.{s.compose}.{s.top_k}.{s.temperature:g}{mode}.npy"
        if trainable and memo.is_file():  # a trained operator's cross-fit is kept (minutes for neural-answer)
            self.timings[s.name] = json.loads(memo.with_suffix(".json").read_text())
            return np.load(memo)
        cpu = time.process_time()
        c = loo_coefficients(self.index, config, groups=self.groups)
        t_op = time.process_time() - cpu
        if trainable:  # cross-fitted 5 times; a bank fits it once for every generate
            t_op /= 5
        self.timings[s.name] = {"signatures": t_sig, "distances": t_dist, "operator": t_op, **probe_answers}
        if trainable:
            memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(memo.with_suffix(".json"), json.dumps(self.timings[s.name]).encode())
            np.save(memo, c)
        return c

    def excluded(self) -> np.ndarray:
        """[n, n] bool: entry j may not predict task t (its own entry; with lofo, every entry of t's family)."""
        if self.groups is None:
            return np.eye(len(self.names), dtype=bool)
        fam = [self.groups.get(n, n) for n in self.names]
        return np.array([[a == b for b in fam] for a in fam])

    # -- evaluation -------------------------------------------------------------------------------------
    def _load(self) -> None:
        if self.model is None:
            self.model, self.tokenizer = load_for_eval(self.bank.base_model)

    def evaluate(self, task: str, adapter_dir: Path | None, shots: int = 0) -> dict:
        """Greedy answers to the task's first `limit` test records, the adapter's update added to the base weights;
        with `shots`, that many training examples (seeded) in the prompt after the task's definition."""
        self._load()
        data = read_dataset(self.suite / task / "test.jsonl")
        samples = data.samples[: self.limit] if self.limit else data.samples
        inputs = [s.input for s in samples]
        if shots:
            inputs = few_shot(read_dataset(self.suite / task / "train.jsonl").subsample(shots, 0).samples, inputs)
        if task not in self.longest:  # the longest training answer, in tokens: once per task, not per setting
            train = read_dataset(self.suite / task / "train.jsonl")
            self.longest[task] = max(len(self.tokenizer(s.output)["input_ids"]) for s in train)
        longest = self.longest[task]
        start = time.perf_counter()
        with merged_adapter(self.model, adapter_dir):
            preds = generate_answers(self.model, self.tokenizer, inputs, batch_size=64 if not shots else 16,
                                     max_new_tokens=longest + 8)
        result = score(preds, type(data)(samples, data.source))
        result["eval_seconds"] = time.perf_counter() - start
        result["predictions"] = preds[:5]
        return result

    @property
    def root(self) -> Path:
        """Cached results, per number of test records (results at another --limit are never mixed in)."""
        return CACHE / f"records-{self.limit or 'all'}"

    @property
    def bank_root(self) -> Path:
        """Cached results that depend on the bank's other entries (coefficients), per bank size and protocol."""
        return self.root / (f"bank-{len(self.names)}" + ("-lofo" if self.protocol == "lofo" else ""))

    def folder(self, s: Setting | str) -> Path:
        """Results of the setting (or setting name): bank-independent ones (the base, the task's own adapter, the base
        with examples in the prompt) under root, the others under bank_root."""
        name = s if isinstance(s, str) else s.name
        independent = name in ("base", "trained") or name.startswith("icl/base-")
        return (self.root if independent else self.bank_root) / name.replace("/", "__")

    def tasks_of(self, s: Setting) -> list[str]:
        return self.tasks if s.name in self.headline else self.grid_tasks

    def pending(self, s: Setting) -> list[str]:
        return [t for t in self.tasks_of(s) if not self.done(s, t)]

    def done(self, s: Setting, task: str, results: dict[str, dict] | None = None) -> bool:
        """Whether s has a result for the task; the equal-compute LoRA's only when trained for the time its reference
        (`results` of this run, else the cache) took, so that it follows a change of `generate --refine`."""
        cached = self.cached(s.name, task)
        if cached is None or s.name != EQUAL_COMPUTE:
            return cached is not None
        return cached["search"]["budget"] == self.equal_budget(s, task, results or {})

    def equal_budget(self, s: Setting, task: str, results: dict[str, dict]) -> float:
        """The equal-compute LoRA's seconds: its reference's CPU seconds on the task (60 before it has any)."""
        ref = results.get(s.warm_start) or self.cached(s.warm_start, task)
        return ref["search"]["cpu_seconds"] if ref else 60.0

    def prepare(self, all_settings: list[Setting]) -> dict[str, np.ndarray]:
        """Coefficient matrices of the settings that still have tasks to evaluate (their timings saved)."""
        coefs = {}
        for s in all_settings:
            self.folder(s).mkdir(parents=True, exist_ok=True)
            if s.name in ("base", "trained", "refine/lorahub", EQUAL_COMPUTE) or (s.group == "icl" and s.signature is None) or not self.pending(s):
                continue
            coefs[s.name] = self.coefficient_matrix(s)
            timing = self.folder(s) / "timing.json"
            if not timing.is_file():  # the first measurement: distance matrices are cached in the bank index after it
                timing.write_text(json.dumps(self.timings.get(s.name, {})))
            print(f"coefficients ready: {s.name} {self.timings.get(s.name, {})}", flush=True)
        return coefs

    def run_task(self, task: str, all_settings: list[Setting], coefs: dict[str, np.ndarray]) -> dict[str, dict]:
        """Evaluate every setting still pending on one task: setting name -> result."""
        i = self.names.index(task)
        results: dict[str, dict] = {}
        for s in all_settings:
            if self.done(s, task, results):
                continue
            compose_s = 0.0
            search = None
            if s.name == "base" or (s.group == "icl" and s.signature is None):
                result = self.evaluate(task, None, s.shots)
            elif s.name == "trained":
                result = self.evaluate(task, self.entries[i].adapter.path)
            else:
                c = coefs[s.name][i] if s.name in coefs else np.zeros(len(self.names))
                if s.name == EQUAL_COMPUTE:
                    result, search = self.train_equal(task, s, self.equal_budget(s, task, results))
                    result["compose_seconds"], result["search"] = 0.0, search
                    results[s.name] = result
                    continue
                if s.keep_exact is not None:  # checked on the training examples: kept if already exact, else trained
                    checked = self.check(task, s, c, refined=s.examples, on_refined=True)[1]
                    exact = checked["scores"][checked["chosen"]][2]
                    if exact >= s.keep_exact:
                        kept = checked.pop("coefficients")
                        result, compose_s = self.evaluate_composition(task, kept, s)
                        search = {"cpu_seconds": checked["cpu_seconds"] + compose_s, "kept": True, "check": checked}
                        result["coefficients"] = [round(float(x), 6) for x in kept]
                    else:  # trained as generate --refine 16 (deterministic: its record is reused when there is one)
                        checked.pop("coefficients")
                        name = FINETUNE16.format(tail=s.warm_start.split("/", 1)[1])
                        ref = results.get(name) or self.cached(name, task)
                        if ref is None:
                            result, search = self.finetune(task, s, c)
                        else:
                            result, search = {k: v for k, v in ref.items() if k != "search"}, dict(ref["search"])
                        search = {**search, "cpu_seconds": search["cpu_seconds"] + checked["cpu_seconds"], "kept": False,
                                  "check": checked}
                    result["compose_seconds"], result["search"] = 0.0, search
                    results[s.name] = result
                    continue
                if s.check_after:  # trained as generate --refine 16, then checked against the untrained candidates
                    result, search = self.trained_or_checked(task, s, c)
                    result["compose_seconds"], result["search"] = 0.0, search
                    results[s.name] = result
                    continue
                if s.finetune:  # checked first (on examples training will not see), as generate --refine 16 --check 16
                    checked = self.check(task, s, c, refined=s.examples)[1] if s.checked else None
                    if checked:
                        c = checked.pop("coefficients")
                    result, search = self.finetune(task, s, c, checked)
                    result["compose_seconds"], result["search"] = 0.0, search
                    results[s.name] = result
                    continue
                if s.group == "refine":
                    lorahub = results.get("refine/lorahub") or self.cached("refine/lorahub", task)
                    budget = lorahub["search"]["cpu_seconds"] if lorahub and s.examples == 5 and s.warm_start != "lorahub" else s.budget
                    c, search = self.search(task, s, c, budget)
                layers = {int(k): v for k, v in search["layers"].items()} if search and "layers" in search else None
                if s.checked:  # after a refinement, as generate: its per-layer weights, examples it did not see
                    refined = search
                    c, search = self.check(task, s, c, layers, s.examples if refined else 0)
                    del search["coefficients"]
                    layers = {int(k): v for k, v in search["layers"].items()} if "layers" in search else None
                    if refined:
                        search = {**search, "cpu_seconds": refined["cpu_seconds"] + search["cpu_seconds"],
                                  "refine": {k: v for k, v in refined.items() if k != "layers"}}
                result, compose_s = self.evaluate_composition(task, c, s, layers)
                result["top"] = [[self.names[j], round(float(c[j]), 4)] for j in np.argsort(-c)[:3]]
                result["coefficients"] = [round(float(x), 6) for x in c]
            result["compose_seconds"] = compose_s
            if search:
                result["search"] = search
            results[s.name] = result
        return results

    def evaluate_composition(self, task: str, c: np.ndarray, s: Setting, layers: dict | None = None) -> tuple[dict, float]:
        """The composition c (with s's method and prompt; the base model when c is zero) evaluated on `task`, kept on
        disk per composition, and the seconds composing it took (0 when kept)."""
        if not c.any():
            return self.evaluate(task, None, s.shots), 0.0
        memo = self.memo(task, c, s, layers)
        if memo.is_file():  # another setting chose the same composition on this task
            return json.loads(memo.read_text()), 0.0
        start = time.perf_counter()  # the search or check is counted by its own record
        comp = compose(self.bank, {n: float(x) for n, x in zip(self.names, c) if x != 0}, method=s.compose, layers=layers)
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            save_adapter(tmp, comp.config, comp.factors)
            result = self.evaluate(task, Path(tmp), s.shots)
        atomic_write_bytes(memo, json.dumps(result).encode())
        return result, seconds

    def memo(self, task: str, c: np.ndarray, s: Setting, layers: dict | None = None) -> Path:
        """Where the evaluation of the composition c (with s's method and prompt) on `task` is kept, so settings that
        choose the same composition share one generation."""
        import hashlib

        blob = [np.round(c, 8).tolist(), s.compose, s.shots] + ([{str(k): v for k, v in sorted(layers.items())}] if layers else [])
        key = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]
        folder = self.bank_root / "by-composition" / task
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{key}.json"

    def check(self, task: str, s: Setting, c: np.ndarray, layers: dict | None = None, refined: int = 0,
              on_refined: bool = False) -> tuple[np.ndarray, dict]:
        """`generate --check E --check-singles K --check-tops N --check-criterion X`: of the base, c at scales 0.5 to
        2, c kept to its top 2..N entries and the top K entries alone, the candidate X prefers on E training examples.
        The checked settings share one check of every candidate (CHECK_SINGLES entries alone, CHECK_TOPS), kept on
        disk; each then chooses among its own candidates and is charged its share of the check's CPU time (one
        forward pass per candidate). After a refinement on `refined` examples (seed 0), as `generate --refine`: the
        refined `layers` are scaled, and the check's examples are drawn from the others; `on_refined`: the check runs
        on the refinement's own examples instead (choosing where training starts)."""
        from loramix.check import check, check_candidates, scaled_layers
        from loramix.runtime.scores import AnswerScores

        coefficients = {n: float(x) for n, x in zip(self.names, c) if x != 0}
        # a generating criterion decodes every candidate's answers: only s's own candidates are checked
        generates = CRITERIA.get(s.check_criterion).generates
        singles, tops = (s.check_singles, s.check_tops) if generates else (CHECK_SINGLES, CHECK_TOPS)
        memo = self.memo(task, c, Setting("check", "lever", compose=s.compose), layers).with_suffix(
            (f".check-generated-singles{singles}-tops{tops}" if generates else f".check-tops{CHECK_TOPS}")
            + f"{f'-on{refined}' if on_refined else f'-without{refined}' if refined else ''}"
            f"{f'-n{s.check_examples}' if s.check_examples != 16 else ''}.json")
        if memo.is_file():
            record = json.loads(memo.read_text())
        else:
            self._load()
            cpu = time.process_time()
            train = read_dataset(self.suite / task / "train.jsonl")
            used = set(train.subsample(refined, 0).samples) if refined else set()
            held = (train.subsample(refined, 0) if on_refined
                    else type(train)([x for x in train.samples if x not in used], train.source))
            res = check(self.bank, coefficients, held, examples=s.check_examples, seed=1, singles=singles, tops=tops,
                        criterion=s.check_criterion if generates else "loss", layers=layers, model=self.model,
                        tokenizer=self.tokenizer)
            record = {"cpu_seconds": time.process_time() - cpu, "scores": {
                k: [v["loss"], v["accuracy"], v["exact"]] + ([v["rouge"]] if generates else []) for k, v in res.candidates.items()}}
            atomic_write_bytes(memo, json.dumps(record).encode())
        scores = {k: AnswerScores(*v) for k, v in record["scores"].items()}
        pool = check_candidates(coefficients, singles=s.check_singles, tops=s.check_tops)
        chosen = CRITERIA.get(s.check_criterion).choose({k: scores[k] for k in pool}, s.check_examples)
        weights = pool[chosen]
        out = np.array([weights.get(n, 0.0) for n in self.names])
        share = len(pool) / len(scores)
        record = {"cpu_seconds": record["cpu_seconds"] * share, "chosen": chosen, "scores": record["scores"], "coefficients": out,
                  "pool": list(pool)}
        if (kept := scaled_layers(chosen, layers)) is not None:
            record["layers"] = {str(k): v for k, v in kept.items()}
        return out, record

    def calibrated_matrix(self, s: Setting) -> np.ndarray:
        """Rows of the calibrated setting: task t's temperature, top-k and scale chosen on the bank's calibration
        without t's fold (entry j in fold j % 5), so no task's own loss picks its parameters."""
        from loramix.calibrate import calibrate

        self._load()
        config = GenerateConfig(signature=s.signature, distance=s.distance, operator=s.operator, compose=s.compose,
                                max_samples=self.max_samples)
        cal = calibrate(self.bank, config, model=self.model, tokenizer=self.tokenizer)
        self.timings[s.name] = {"calibration_cpu_seconds": cal.seconds}
        n = len(self.names)
        out = np.zeros((n, n))
        for t in range(n):
            best = cal.select([j for j in range(n) if j % 5 != t % 5])
            rows = loo_coefficients(self.index, replace(config, temperature=best.temperature, top_k=best.top_k),
                                    groups=self.groups)
            out[t] = best.scale * rows[t]
        return out

    def cached(self, setting: str, task: str) -> dict | None:
        file = self.folder(setting) / f"{task}.json"
        return json.loads(file.read_text()) if file.is_file() else None

    def store(self, task: str, results: dict[str, dict]) -> None:
        for name, result in results.items():
            folder = self.folder(name)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(folder / f"{task}.json", json.dumps(result).encode())
            print(f"{name:45s} {task:40s} rougeL {result['rougeL']:.3f} em {result['exact_match']:.3f}", flush=True)

    def search(self, task: str, s: Setting, c: np.ndarray, budget: float | None) -> tuple[np.ndarray, dict]:
        """Weights found on 5 labelled examples of the task's train split, and the search's record (CPU seconds).
        LoraHub: 20 random other entries, weights from 0 in [-1.5, 1.5], 40 NGOpt steps, L1 0.05, A and B mixed
        separately. loramix: the warm-start setting's top 8 entries, gradient steps on their weights for at most
        40 steps and at most `budget` seconds (LoraHub's time on the same task)."""
        import zlib

        from loramix.refine import RefineConfig, refine, search_weights

        self._load()
        i = self.names.index(task)
        train = read_dataset(self.suite / task / "train.jsonl")
        cpu = time.process_time()
        layers = None
        if s.warm_start == "lorahub":
            rng = np.random.default_rng(zlib.crc32(task.encode()))
            allowed = [j for j in range(len(self.names)) if not self.excluded()[i, j]]
            pick = rng.choice(allowed, size=min(20, len(allowed)), replace=False)
            cfg = RefineConfig(examples=5, method="nevergrad", steps=40, l1=0.05)
            samples = train.subsample(cfg.examples, cfg.seed).samples
            w, first, last, history = search_weights(self.model, self.tokenizer, self.bank, [self.entries[j] for j in pick],
                                                     np.zeros(len(pick)), samples, cfg, method="paper")
            out = np.zeros(len(self.names))
            out[pick] = w
        else:
            cfg = RefineConfig(examples=s.examples, top_k=8, method="gradient", steps=40, budget=budget, per_layer=s.per_layer)
            r = refine(self.bank, dict(zip(self.names, map(float, c))), train, cfg, model=self.model, tokenizer=self.tokenizer)
            out = np.array([r.coefficients[n] for n in self.names])
            first, last, history = r.initial_loss, r.loss, r.history
            layers = r.layer_weights()
        record = {"cpu_seconds": time.process_time() - cpu, "initial_loss": first, "loss": last, "steps": len(history)}
        if s.warm_start != "lorahub" and layers:
            record["layers"] = {str(k): {n: w for n, w in v.items() if w} for k, v in layers.items()}
        return out, record

    def train_equal(self, task: str, s: Setting, budget: float) -> tuple[dict, dict]:
        """The equal-compute baseline: a LoRA trained from scratch on `s.examples` training examples (the refinement's)
        with `generate --refine`'s recipe (REFINE_TRAINING, up to the bank's 150 steps) for `budget` seconds, then
        evaluated like every setting."""
        from loramix.train import train
        from loramix.train_config import BANK_TRAINING

        data = read_dataset(self.suite / task / "train.jsonl").subsample(s.examples, 0)
        cpu = time.process_time()
        with tempfile.TemporaryDirectory() as tmp:
            cfg = replace(REFINE_TRAINING, steps=BANK_TRAINING.steps, budget=budget, max_tokens=None)
            record = train(data, Path(tmp) / "lora", cfg, base=self.bank.base_model)
            seconds = time.process_time() - cpu
            result = self.evaluate(task, Path(tmp) / "lora")
        return result, {"cpu_seconds": seconds, "budget": budget, "steps": len(record["loss"]), "loss": record["loss"][-1]}

    def finetune(self, task: str, s: Setting, c: np.ndarray, checked: dict | None = None) -> tuple[dict, dict]:
        """The composition c written as an adapter, then trained (BANK_TRAINING's optimizer, from its factors; from
        scratch when c is the base model) on `s.examples` training examples, then evaluated. Training may take
        `s.budget` seconds less the `checked` record's; the CPU seconds are the check's, the composition's and the
        training's."""
        data = read_dataset(self.suite / task / "train.jsonl").subsample(s.examples, 0)
        spent = checked["cpu_seconds"] if checked else 0.0
        budget = None if s.budget is None else max(1.0, s.budget - spent)
        cpu = time.process_time()
        with tempfile.TemporaryDirectory() as tmp:
            record = self.train_composition(Path(tmp), data, s, c, budget)
            seconds = time.process_time() - cpu + spent
            result = self.evaluate(task, Path(tmp) / "lora")
        result["coefficients"] = [round(float(x), 6) for x in c]
        return result, {"cpu_seconds": seconds, "budget": budget, "steps": len(record["loss"]), "loss": record["loss"][-1],
                        "initial_loss": record["loss"][0], **({"check": checked} if checked else {})}

    def train_composition(self, tmp: Path, data, s: Setting, c: np.ndarray, budget: float | None = None,
                          model=None) -> dict:
        """The composition c written under `tmp`, then trained on `data` (BANK_TRAINING with s's learning rate,
        warmup, steps and batch size where given, for at most `budget` seconds; from scratch when c is the base model)
        into tmp/lora; the training record. `model`: the base, loaded, which gains the trained LoRA layers."""
        from loramix.train import train
        from loramix.train_config import BANK_TRAINING

        init = None
        if c.any():
            comp = compose(self.bank, {n: float(x) for n, x in zip(self.names, c) if x != 0}, method=s.compose)
            save_adapter(tmp / "composed", comp.config, comp.factors)
            init = tmp / "composed"
        tuned = {k: v for k, v in (("lr", s.lr), ("warmup", s.warmup), ("steps", s.steps), ("batch_size", s.batch_size),
                                   ("max_tokens", s.max_tokens)) if v is not None}
        return train(data, tmp / "lora", replace(BANK_TRAINING, budget=budget, **tuned), base=self.bank.base_model,
                     init=init, model=model, tokenizer=self.tokenizer if model is not None else None)

    def trained_or_checked(self, task: str, s: Setting, c: np.ndarray) -> tuple[dict, dict]:
        """`generate --refine 16 --check 16`: the composition c trained as `generate --refine 16` on 16 training
        examples, then scored with the check's untrained candidates on 16 examples training did not see; the
        candidate s's criterion prefers is evaluated. The trained adapter's scores are kept on disk per task; its
        evaluation is the `generate --refine 16` record's when there is one (the same seeded training)."""
        from loramix.runtime.pytorch import load_model
        from loramix.runtime.pytorch import answer_scores_fn
        from loramix.runtime.scores import AnswerScores

        name = FINETUNE16.format(tail=s.warm_start.split("/", 1)[1])
        ref = self.cached(name, task)
        memo = self.memo(task, c, Setting("trained", "lever", compose=s.compose)).with_suffix(
            f".trained{s.examples}-scores-n{s.check_examples}.json")
        tuned = replace(s, name=name, check_after=False, checked=False)
        if memo.is_file() and ref is not None:
            trained = json.loads(memo.read_text())
        else:
            self._load()
            data = read_dataset(self.suite / task / "train.jsonl")
            used = set(data.subsample(s.examples, 0).samples)
            held = type(data)([x for x in data.samples if x not in used], data.source).subsample(s.check_examples, 1)
            cpu = time.process_time()
            with tempfile.TemporaryDirectory() as tmp:
                model = load_model(self.bank.base_model)
                record = self.train_composition(Path(tmp), data.subsample(s.examples, 0), s, c, model=model)
                model.eval()
                scoring = time.process_time()
                scores = answer_scores_fn(model, self.tokenizer, held.samples)()
                now = time.process_time()
                seconds, scoring = now - cpu, now - scoring
                if ref is None:
                    ref = {**self.evaluate(task, Path(tmp) / "lora"), "search": {"cpu_seconds": seconds,
                                                                                  "steps": len(record["loss"])}}
                    atomic_write_bytes(self.folder(tuned) / f"{task}.json", json.dumps(ref).encode())
            trained = {"cpu_seconds": scoring, "scores": [scores.loss, scores.accuracy, scores.exact]}
            atomic_write_bytes(memo, json.dumps(trained).encode())
        _, checked = self.check(task, s, c, refined=s.examples)
        pool = {"trained": AnswerScores(*trained["scores"]),
                **{k: AnswerScores(*checked["scores"][k]) for k in checked["pool"]}}
        chosen = CRITERIA.get(s.check_criterion).choose(pool, s.check_examples)
        cpu = ref["search"]["cpu_seconds"] + checked["cpu_seconds"] + trained["cpu_seconds"]
        if chosen == "trained":
            result = {k: v for k, v in ref.items() if k != "search"}
        else:
            result, _ = self.evaluate_composition(task, checked["coefficients"] if checked["chosen"] == chosen
                                                  else self.candidate(c, s, chosen), s)
        return result, {"cpu_seconds": cpu, "chosen": chosen, "trained": trained["scores"],
                        "check": {k: v for k, v in checked.items() if k != "coefficients"}}

    def candidate(self, c: np.ndarray, s: Setting, label: str) -> np.ndarray:
        """The coefficients of check candidate `label` of composition c, over the bank's names."""
        from loramix.check import check_candidates

        pool = check_candidates({n: float(x) for n, x in zip(self.names, c) if x != 0}, singles=s.check_singles,
                                tops=s.check_tops)
        return np.array([pool[label].get(n, 0.0) for n in self.names])

    def collect(self, s: Setting) -> dict[str, dict]:
        out = {t: json.loads((self.folder(s) / f"{t}.json").read_text()) for t in self.tasks_of(s)}
        timing = self.folder(s) / "timing.json"
        if timing.is_file():
            out["__timing__"] = json.loads(timing.read_text())
        return out


def few_shot(examples, inputs: list[str]) -> list[str]:
    """In-context prompts: the task's definition (the inputs' shared first paragraph, if any) once, then the examples
    as Input / Output pairs, then the query."""
    def split(text: str) -> tuple[str, str]:
        head, sep, rest = text.partition("\n\n")
        return (head, rest) if sep else ("", text)

    definition = split(inputs[0])[0] if all(split(x)[0] == split(inputs[0])[0] for x in inputs) else ""
    strip = (lambda x: split(x)[1]) if definition else (lambda x: x)
    shots = "\n\n".join(f"Input: {strip(e.input)}\nOutput: {e.output}" for e in examples)
    return [(definition + "\n\n" if definition else "") + f"{shots}\n\nInput: {strip(x)}\nOutput:" for x in inputs]


def _evaluate_task(runner: "Runner", item: tuple) -> dict[str, dict]:
    """Engine work item: every pending setting of one task, on a worker holding its own Runner (and model)."""
    task, all_settings, coefs = item
    return runner.run_task(task, all_settings, coefs)


def paired_interval(a: np.ndarray, b: np.ndarray, draws: int = 10_000, seed: int = 0) -> str:
    """mean(a - b) over tasks and its 95% paired bootstrap interval (tasks resampled with replacement), as text."""
    d = np.asarray(a) - np.asarray(b)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(draws, len(d)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return f"{d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]"


def family_of(suite: Path) -> dict[str, str]:
    index = suite / "suite.json"
    if index.is_file():
        return {t["name"]: t["family"] for t in json.loads(index.read_text())}
    return {}


def write_report(runner: Runner, results: dict[str, dict], all_settings: list[Setting], args) -> None:
    names, grid = runner.tasks, runner.grid_tasks
    families = family_of(runner.suite)
    chosen = args.default_setting
    comp = composition_setting().name

    def mean(setting: str, metric: str, tasks: list[str]) -> float:
        return float(np.mean([results[setting][t][metric] for t in tasks]))

    def table(settings: list[Setting], tasks: list[str]) -> list[str]:
        """Mean scores of `settings` over `tasks`, gap closed against base and trained on the same tasks, the paired
        bootstrap interval of the difference to the default, and the tasks where the setting is below the base."""
        base, trained = mean("base", "rougeL", tasks), mean("trained", "rougeL", tasks)
        lines = ["| setting | group | ROUGE-L | exact match | contains | gap closed | vs default [95% CI] | tasks < base | "
                 "CPU s / task |", "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
        ref = np.array([results[chosen][t]["rougeL"] for t in tasks]) if chosen in results else None
        below_base = np.array([results["base"][t]["rougeL"] for t in tasks])
        for s in settings:
            r = results[s.name]
            rl = mean(s.name, "rougeL", tasks)
            gap = (rl - base) / (trained - base) if trained != base else float("nan")
            timing = r.get("__timing__", {})
            per_task = float(np.mean([r[t]["compose_seconds"] + r[t].get("search", {}).get("cpu_seconds", 0.0) for t in tasks]))
            cpu = timing.get("distances", 0.0) + timing.get("operator", 0.0) + per_task
            mark = (" **(default)**" if s.name == chosen else " (default composition, `--check 0`)" if s.name == comp
                    else " (the default before issue 14)" if s.name == PREVIOUS_DEFAULT else "")
            scores = np.array([r[t]["rougeL"] for t in tasks])
            diff = "-" if ref is None or s.name == chosen else paired_interval(scores, ref)
            below = int((scores < below_base - 1e-9).sum()) if s.name != "base" else 0
            lines.append(f"| {s.name}{mark} | {s.group} | {rl:.4f} | {mean(s.name, 'exact_match', tasks):.4f} | "
                         f"{mean(s.name, 'contains', tasks):.4f} | {gap:.3f} | {diff} | {below} | {cpu:.1f} |")
        return lines

    headline = [s for s in all_settings if s.name in runner.headline]
    subset = len(grid) < len(names)
    lines = [
        "# Leave-one-family-out quality on the default bank" if runner.protocol == "lofo" else
        "# Leave-one-out quality on the default bank",
        "",
        f"Reproduce: `python benchmarks/quality.py {' '.join(sys.argv[1:])}` ({'quick subset; ' if args.quick else ''}"
        f"loramix {loramix.__version__}, {platform.machine()}, {os.cpu_count()} CPUs).",
        "",
        f"Bank: {runner.bank.path.name} ({len(runner.names)} adapters of {runner.bank.base_model}, rank {runner.bank.max_rank}). "
        + (f"Each task's adapter is predicted from the entries of the other families only (the suite's {len(set(families.values()))} "
           "families; its check's and refinement's candidates drawn from them too) "
           if runner.protocol == "lofo" else f"Each task's adapter is predicted from the other {len(runner.names) - 1} entries ")
        + "and evaluated on its test split "
        f"({'first ' + str(args.limit) + ' records' if args.limit else 'all records'}), greedy decoding with the chat template. "
        "Gap closed = (setting - base) / (trained - base) on mean ROUGE-L over the same tasks. vs default = the mean "
        "per-task ROUGE-L difference to the default, with its 95% paired bootstrap interval (tasks resampled, 10,000 "
        "draws); tasks < base = tasks where the setting scores below the base model. CPU s / task = the bank's "
        "distance matrix, the operator (a trained one: one of its 5 cross-fitted fits, done once per bank), and per task the composition and any search or check, "
        "in seconds; the signatures (computed once per bank and cached, see speed.md for their cost), the bank "
        "calibration (given below) and generation are not included. Calibrated settings are cross-fitted: task t's "
        "temperature, top-k and scale are chosen on the bank's calibration without t's fold (5 folds); so is the "
        "`neural-answer` operator (fitted without t's fold), whose fitting is in its CPU s. Checked "
        "settings (`generate --check 16`) keep, of the base model, the composition at scales 0.5 to 2, (topsN) the "
        "composition kept to its top 2..N entries and (singlesK) the top K entries alone, the candidate their "
        "criterion (answer loss; -acc: teacher-forced token accuracy; -exact: answers teacher-forced exactly, then "
        "accuracy; -rouge: ROUGE-L of each candidate's greedy answers, then accuracy) prefers on 16 of the task's "
        "training examples (checked32: 32, `--check 32`); their CPU s include their share of the check's "
        f"forward passes (one check of every candidate, the top {CHECK_SINGLES} entries alone and tops{CHECK_TOPS} "
        "included, shared by the checked settings, each charged for the candidates it compares; a -rouge check "
        "generates for its own candidates only and is charged in full). The "
        "default is checked; its composition is also shown unchecked (`--check 0`), and so is the default before issue "
        "14 (the `embed` signature, no check). In-context "
        "settings put 5 or 16 training examples in the prompt.",
        "",
    ]
    if subset:
        lines += [f"## Headline settings on {len(names)} of the bank's {len(runner.names)} tasks", "", *table(headline, names), "",
                  f"## Every setting on one task in every {args.every} ({len(grid)} of {len(names)} tasks in name order, "
                  "all families; `--every 1` runs the whole grid on every task)", ""]
    lines += table(all_settings, grid)
    calibrated = [s for s in all_settings if s.calibrated and "__timing__" in results[s.name]]
    if calibrated:
        cpu = results[calibrated[0].name]["__timing__"].get("calibration_cpu_seconds")
        if cpu is not None:
            lines += ["", f"Bank calibration (`loramix bank calibrate`, {len(runner.names)} entries x 8 examples, 12 "
                      f"candidates): {cpu:.0f} CPU seconds, once per bank and setting."]
    # the probe answers' first measurement (the other data-free settings found them cached)
    probed = sorted((results[s.name].get("__timing__", {}) for s in all_settings if s.group == "datafree"),
                    key=lambda t: -t.get("probe_answers", 0.0))
    if probed and "probe_answers" in probed[0]:
        lines += ["", f"Data-free settings (-probes, `generate --entry-signatures probes`) hide every bank entry's data: each "
                  f"entry is signed by its greedy answers (at most {MAX_NEW_TOKENS} new tokens) to the "
                  f"{len(ProbeSet().prompts)} probe prompts shipped with loramix, the held-out task's data making its "
                  "own signature as a user's dataset does. Their answers, computed once per bank with the base model: "
                  f"{probed[0]['probe_answers']:.0f} CPU seconds ({probed[0]['probe_answers_wall']:.0f} s wall) for "
                  f"{len(runner.names)} entries, not in CPU s / task; their signatures, like the data signatures, are "
                  "cached and not included either.", ""]
        for s in (s for s in all_settings if s.group == "datafree"):
            aware, base = s.name.removesuffix("-probes"), mean("base", "rougeL", names)
            scores = np.array([results[s.name][t]["rougeL"] for t in names])
            vs = {x: paired_interval(scores, np.array([results[x][t]["rougeL"] for t in names]))
                  for x in ("uniform", aware) if x in results}
            kept = ((mean(s.name, "rougeL", names) - base) / (mean(aware, "rougeL", names) - base)) if aware in results else float("nan")
            lines.append(f"- {s.name}: " + "; ".join(f"vs {x} {v}" for x, v in vs.items())
                         + f"; keeps {kept:.0%} of the data-aware setting's gain over the base model")
    refined = [s for s in all_settings if s.group == "refine"]
    if refined:
        base, trained = mean("base", "rougeL", names), mean("trained", "rougeL", names)
        lines += ["", f"## Refinement on labelled training examples (evaluation on the test split), {len(names)} tasks", "",
                  "LoraHub and refine5 see 5 examples, the others 16. refine16 searches the top 8 entries' weights (-layers: "
                  "per layer) for at most 60 s (`generate --refine-method gradient`); -budget36-checked: that "
                  "search for at most 36 s, then the check by token accuracy on 16 examples it did not see. finetune16 trains the composition's LoRA "
                  "factors (AdamW, batches of 8, from the composition) on the 16 examples: -stepsN-warmup2 for N steps "
                  "with 2 warmup steps (-lr0.004: learning rate 4e-3 instead of 2e-3; -batch4: 4 examples a step instead "
                  "of 8; -tokensT: only the first steps whose token positions, the shared prompt prefix counted once, "
                  "fit T); "
                  f"{GENERATE_REFINE.format(tail='').split('-', 1)[1]} is `generate "
                  "--refine 16`. The budget settings train with the bank's recipe (10 warmup steps) for 55 s (-budget48: "
                  "48 s; -warmup2: 2 warmup steps; -lr4e-3: learning rate 4e-3); checked-finetune16 checks first and "
                  "trains for 55 s less the check's time; keep-exactX first runs the check by token accuracy on the 16 training examples themselves and keeps its candidate, untrained, when it reproduces at least the fraction X of them exactly (teacher-forced), else trains the composition as `generate --refine 16` (keep-exact0: the candidate, never trained). The LoRA trained from scratch (the same recipe as `generate "
                  "--refine 16`, up to 150 steps) trains for as long as `generate --refine 16` took on the same task. "
                  "Search CPU s: the composition, the base model's load and the search or training and any check, one "
                  "thread.", "",
                  "| setting | ROUGE-L | exact match | gap closed | vs default [95% CI] | search CPU s / task |",
                  "| --- | ---: | ---: | ---: | --- | ---: |"]
        ref = np.array([results[chosen][t]["rougeL"] for t in names])
        for name in [chosen] + [s.name for s in refined] + ["trained"]:
            diff = "-" if name == chosen else paired_interval(np.array([results[name][t]["rougeL"] for t in names]), ref)
            rl = mean(name, "rougeL", names)
            cpu = np.mean([results[name][t].get("search", {}).get("cpu_seconds", 0.0) for t in names])
            gap = (rl - base) / (trained - base) if trained != base else float("nan")
            lines.append(f"| {name} | {rl:.4f} | {mean(name, 'exact_match', names):.4f} | {gap:.3f} | {diff} | {cpu:.1f} |")
    if families:
        fams = sorted({families.get(t, "?") for t in names})
        levers = [s.name for s in all_settings if s.group == "lever" and s.name in runner.headline]
        show = [x for x in dict.fromkeys(["base", "trained", "uniform", "paper/unigram-kl-attentional", PREVIOUS_DEFAULT, chosen,
                                          *levers]) if x in results]
        lines += ["", f"## ROUGE-L per family ({len(names)} tasks)", "", "| family | tasks | " + " | ".join(show) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in show) + " |"]
        for f in fams:
            ts = [t for t in names if families.get(t) == f]
            lines.append(f"| {f} | {len(ts)} | " + " | ".join(f"{mean(x, 'rougeL', ts):.3f}" for x in show) + " |")
    if chosen not in results:  # a partial run (--only without the default): the tables above only
        names = []
    cols = [x for x in ("base", "trained", "uniform") if x in results]
    lines += ["", "## Per task (ROUGE-L)", "", "| task | " + " | ".join(cols) + " | default | default's top entries |",
              "| --- | " + " | ".join("---:" for _ in cols) + " | ---: | --- |"]
    for t in names:
        top = ", ".join(f"{n} {c:.2f}" for n, c in results[chosen][t].get("top", []))
        lines.append(f"| {t} | " + " | ".join(f"{results[x][t]['rougeL']:.3f}" for x in cols)
                     + f" | {results[chosen][t]['rougeL']:.3f} | {top} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    if args.out == "quality.md" and names:
        heatmap(results[chosen], names, runner.names, RESULTS / "coefficients.png", chosen)


def heatmap(result: dict, tasks: list[str], entries: list[str], path: Path, title: str) -> None:
    """The leave-one-out coefficients [tasks, entries] as an image, like the paper's Figure 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = np.array([result[t]["coefficients"] for t in tasks])
    fig, ax = plt.subplots(figsize=(11, 10))
    im = ax.imshow(c, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(entries)), entries, rotation=90, fontsize=6)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=6)
    ax.set_xlabel("bank entry (source)")
    ax.set_ylabel("task predicted (leave-one-out)")
    ax.set_title(f"coefficients: {title}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bank", default="default")
    p.add_argument("--suite", default="default")
    p.add_argument("--limit", type=int, default=30, help="test records per task")
    p.add_argument("--max-samples", type=int, default=GenerateConfig().max_samples, help="signature samples per dataset")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a handful of settings only")
    p.add_argument("--default-setting", default=default_setting().name, help="the setting marked as generate's default")
    p.add_argument("--only", nargs="*", help="run only these settings (names, or groups: reference, lever, datafree, ...)")
    p.add_argument("--engine", default="local", help="local, or ray (RAY_ADDRESS, else a local Ray cluster)")
    p.add_argument("--workers", type=int, default=None, help="at most this many Ray workers (one CPU each)")
    p.add_argument("--refine", action="store_true", help="also LoraHub's recipe and --refine on 5 examples")
    p.add_argument("--levers", action="store_true", help="also calibration, the held-out check and in-context learning")
    p.add_argument("--datafree", action="store_true", help="also the default and its composition with every entry's "
                   "data hidden (entries signed by their answers to the probe prompts)")
    p.add_argument("--tasks", type=int, default=None, help="only the first N tasks of the bank (a subset)")
    p.add_argument("--out", default=None, help="the results file (in benchmarks/results/; default quality.md, with "
                   "--protocol lofo quality-lofo.md)")
    p.add_argument("--protocol", choices=("loo", "lofo"), default="loo", help="loo: each task predicted from every "
                   "other entry; lofo: from the entries of the other families only (leave-one-family-out)")
    p.add_argument("--spread", type=int, default=1, help="only every K-th task of the bank, in name order (a subset "
                   "over all families, for every setting)")
    p.add_argument("--every", type=int, default=1, help="the settings beyond the headline ones on every K-th task only, in "
                   "name order (a subset spread over all families); coefficients always use every entry")
    args = p.parse_args()
    args.out = args.out or ("quality-lofo.md" if args.protocol == "lofo" else "quality.md")
    runner = Runner(args.bank, resolve_suite(args.suite), args.limit, args.max_samples, args.protocol)
    all_settings = settings(args.top_k, args.quick)
    default = next(s for s in all_settings if s.name == args.default_setting)
    comp = composition_setting()
    if args.levers:
        all_settings += lever_settings(comp, default)
    if args.refine:
        all_settings += refine_settings(comp)
    if args.datafree:  # beside the default's composition unchecked (a lever, also run here)
        all_settings += [replace(comp, group="lever"), *datafree_settings(comp, default)]
    unique: dict[str, Setting] = {}
    for s in all_settings:  # a lever that is the default is listed once, as the default
        unique.setdefault(s.name, s)
    all_settings = list(unique.values())
    if args.only:
        # the references and the default always run: the report's gap and intervals are measured against them
        keep = {"base", "trained", args.default_setting} | ({comp.name} if "datafree" in args.only else set())
        all_settings = [s for s in all_settings if s.name in args.only or s.group in args.only or s.name in keep]
    runner.tasks = runner.tasks[: args.tasks][args.spread // 2 :: args.spread]
    runner.grid_tasks = runner.tasks[args.every // 2 :: args.every]  # the middle task of every K
    runner.headline = {s.name for s in all_settings if s.group != "loramix" or s.name in (args.default_setting, comp.name)}
    coefs = runner.prepare(all_settings)
    items = [(t, [s for s in all_settings if t in runner.pending(s)], coefs) for t in runner.tasks]
    engine = RayEngine(max_workers=args.workers) if args.engine == "ray" else get_engine(args.engine)
    engine.map(_evaluate_task, [item for item in items if item[1]], "leave-one-out evaluation",
               setup=partial(Runner, args.bank, runner.suite, args.limit, args.max_samples, args.protocol),
               on_result=lambda item, res: runner.store(item[0], res))
    results = {s.name: runner.collect(s) for s in all_settings}
    write_report(runner, results, all_settings, args)
    print((RESULTS / args.out).read_text())


if __name__ == "__main__":
    main()
