"""Teacher-forced leave-one-out screen (`make bench-proxy`): every candidate composition of every bank task scored by
forward passes only, on the task's test records (first `--limit`) and on `--check` of its training examples.

A candidate is a weight vector over the bank's entries (the task's own entry always 0, but for `trained`), applied
exactly by forward hooks (runtime.lora.MixedLoRA), so nothing is composed, written or generated. Scores per candidate:
answer loss, token accuracy and teacher-forced exact match (runtime.scores.AnswerScores; exact match is what greedy
decoding reproduces). Selectors then pick one candidate per task from a pool by a criterion on the *training*
examples, as `generate --check` would, and are reported on the *test* records. This screens levers in minutes
where `make bench-quality` (generation, ROUGE-L) takes hours; the headline table stays quality.py's.

Per-task scores are cached under .cache/bench-proxy/ so an interrupted run resumes."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("LORAMIX_PROGRESS", "0")

from loramix import Bank, BankIndex, GenerateConfig  # noqa: E402
from loramix.data import read_dataset  # noqa: E402
from loramix.files import atomic_write_bytes  # noqa: E402
from loramix.bank_operator import loo_coefficients  # noqa: E402
from loramix.paths import resolve_suite  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "benchmarks" / "results"))
CACHE = Path(os.environ.get("BENCH_CACHE", ROOT / ".cache" / "bench-proxy"))
SCALES = (0.5, 1.0, 1.5, 2.0)
SOURCES = {  # coefficient sources: name -> GenerateConfig overrides
    "embed": {},
    "embed-io": {"signature": "embed-io"},
    "embed-T0.5": {"temperature": 0.5},
    "embed-io-T0.5": {"signature": "embed-io", "temperature": 0.5},
}
SINGLES = 8  # the top entries of each source alone, at scale 1
SCREEN_T = (0.1, 0.3)  # temperatures (nats per token) of the screened mixes


def candidates(c: dict[str, np.ndarray], t: int, n: int) -> dict[str, np.ndarray]:
    """Candidate weight vectors [n] for task t: base, trained, each source at each scale, its top singles."""
    out = {"base": np.zeros(n), "trained": np.eye(n)[t]}
    for name, rows in c.items():
        for s in SCALES:
            out[f"{name}@{s:g}"] = s * rows[t]
        for j in np.argsort(-rows[t])[:SINGLES]:
            out[f"single:{j}"] = np.eye(n)[j]
    return out


def screened(scores: dict[str, dict], n: int) -> dict[str, np.ndarray]:
    """Mixes of the singles that beat the base on the check examples, weighted by softmin of their check loss at each
    temperature of SCREEN_T, summing to 1 or 1.5; none when no single beats the base."""
    base = scores["base"]["check"][0]
    good = {int(c.split(":")[1]): v["check"][0] for c, v in scores.items() if c.startswith("single:") and v["check"][0] < base}
    out = {}
    if not good:
        return out
    idx = np.array(list(good))
    loss = np.array([good[j] for j in idx])
    for temp in SCREEN_T:
        w = np.exp(-(loss - loss.min()) / temp)
        for s in (1.0, 1.5):
            v = np.zeros(n)
            v[idx] = s * w / w.sum()
            out[f"screen-T{temp:g}@{s:g}"] = v
    return out


def score_task(runner: dict, t: int, coefs: dict[str, np.ndarray], limit: int, check: int, refine: str | None = None) -> dict:
    """{candidate: {'test': [loss, accuracy, exact], 'check': [...]}} for task t."""
    import torch

    from loramix.runtime.pytorch import answer_scores_fn

    bank, model, tok, mixed, suite = runner["bank"], runner["model"], runner["tok"], runner["mixed"], runner["suite"]
    name = bank.usable[t].name
    test = read_dataset(suite / name / "test.jsonl").samples[:limit]
    train = read_dataset(suite / name / "train.jsonl").subsample(check, 1).samples
    fns = {"test": answer_scores_fn(model, tok, test), "check": answer_scores_fn(model, tok, train)}
    out = {}

    def run(cands: dict[str, np.ndarray]) -> None:
        for cand, w in cands.items():
            mixed.weights = torch.as_tensor(w, dtype=torch.float32)
            out[cand] = {k: list(map(float, (s.loss, s.accuracy, s.exact))) for k, fn in fns.items() for s in [fn()]}

    every = candidates(coefs, t, len(bank.usable))
    if refine == "only":
        run({k: every[k] for k in ("base", "trained", "embed@1")})
    else:
        run(every)
        run(screened(out, len(bank.usable)))
    if refine:
        run_refine(runner, t, coefs["embed"][t], train, run, out)
    return out


REFINES = {  # refinement on the check examples, at most 60 s (then scored on the test records; never a candidate)
    "refine-top8": dict(top_k=8, budget=60.0),
    "refine-top8-layers": dict(top_k=8, per_layer=True, budget=60.0),
    "refine-top8-layers-lr0.1": dict(top_k=8, per_layer=True, budget=60.0, lr=0.1),
}


def run_refine(runner: dict, t: int, c: np.ndarray, samples: list, run, out: dict) -> None:
    """Each REFINES setting from c's top entries, 40 gradient steps on `samples`; records its CPU seconds."""
    import torch

    from loramix.refine import RefineConfig, search_weights

    bank, mixed = runner["bank"], runner["mixed"]
    n = len(bank.usable)
    for label, kw in REFINES.items():
        cfg = RefineConfig(examples=len(samples), steps=40, **kw)
        top = np.argsort(-c)[: cfg.top_k]
        mixed.weights = torch.zeros(n)  # the screen's own hooks add nothing while the search runs
        cpu = time.process_time()
        w, first, last, _ = search_weights(runner["model"], runner["tok"], bank, [bank.usable[j] for j in top], c[top],
                                           samples, cfg)
        seconds = time.process_time() - cpu
        full = np.zeros((len(mixed.layers), n) if w.ndim == 2 else n)
        full[..., top] = w
        run({label: full})
        out[label]["cpu"] = seconds
        out[label]["loss"] = [first, last]


def select(task: dict, pool: list[str], criterion: str) -> str:
    """The candidate of `pool` that `criterion` prefers on the task's check examples: 'loss' (lowest), 'accuracy'
    (highest token accuracy, then lowest loss), 'exact' (highest exact match, then accuracy, then loss)."""
    key = {
        "loss": lambda c: task[c]["check"][0],
        "accuracy": lambda c: (-task[c]["check"][1], task[c]["check"][0]),
        "exact": lambda c: (-task[c]["check"][2], -task[c]["check"][1], task[c]["check"][0]),
    }[criterion]
    return min(pool, key=key)


def report(results: dict[str, dict], names: list[str], families: dict[str, str], args) -> str:
    tasks = [n for n in names if n in results]
    fixed = ["base", "trained"] + [f"{s}@{x:g}" for s in SOURCES for x in SCALES]
    fixed = [c for c in fixed + list(REFINES) if all(c in results[t] for t in tasks)]
    rows: dict[str, list[str]] = {c: [c] * len(tasks) for c in fixed}
    pools = {  # selector pools, each with the base model
        "embed scales": lambda t: [c for c in results[t] if c.startswith("embed@")],
        "embed-io scales": lambda t: [c for c in results[t] if c.startswith("embed-io@")],
        "embed+io scales": lambda t: [c for c in results[t] if c.startswith(("embed@", "embed-io@"))],
        "embed scales+singles": lambda t: [c for c in results[t] if c.startswith(("embed@", "single:"))],
        "embed scales+screen": lambda t: [c for c in results[t] if c.startswith(("embed@", "screen-"))],
        "all": lambda t: [c for c in results[t] if c not in ("trained", "base") and not c.startswith("refine")],
    }
    for label, pool in pools.items():
        for crit in ("loss", "accuracy", "exact"):
            rows[f"check[{label}]/{crit}"] = [select(results[t], ["base", *pool(t)], crit) for t in tasks]
    metric = {"loss": 0, "accuracy": 1, "exact": 2}

    def values(row: list[str], m: str) -> np.ndarray:
        return np.array([results[t][c]["test"][metric[m]] for t, c in zip(tasks, row)])

    base_acc, tr_acc = values(rows["base"], "accuracy"), values(rows["trained"], "accuracy")
    base_ex, tr_ex = values(rows["base"], "exact"), values(rows["trained"], "exact")
    default = values(rows["embed@1"], "accuracy")
    lines = [
        "# Teacher-forced leave-one-out screen (forward passes only)", "",
        f"Reproduce: `python benchmarks/proxy.py {' '.join(sys.argv[1:])}`. {len(tasks)} tasks; test = the first "
        f"{args.limit} test records, check = {args.check} training examples (seed 1). accuracy = answer tokens that are "
        "the argmax given the reference prefix; exact = records whose every answer token is (what greedy decoding "
        "reproduces); gap = (x - base) / (trained - base) of the means; vs embed@1 = mean paired accuracy difference "
        "to today's default with its 95% bootstrap interval; < base = tasks below the base's accuracy.", "",
        "| candidate or selector | loss | accuracy | exact | gap (acc) | gap (exact) | vs embed@1 (acc) | < base | CPU s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for label, row in rows.items():
        acc, ex, loss = values(row, "accuracy"), values(row, "exact"), values(row, "loss")
        ga = (acc.mean() - base_acc.mean()) / (tr_acc.mean() - base_acc.mean())
        ge = (ex.mean() - base_ex.mean()) / (tr_ex.mean() - base_ex.mean())
        below = int((acc < base_acc - 1e-9).sum())
        cpu = np.mean([results[t][c].get("cpu", 0.0) for t, c in zip(tasks, row)])
        lines.append(f"| {label} | {loss.mean():.3f} | {acc.mean():.4f} | {ex.mean():.4f} | {ga:.3f} | {ge:.3f} | "
                     f"{interval(acc, default)} | {below} | {cpu:.1f} |")
    if families:
        show = ["base", "trained", "embed@1", "check[embed scales]/loss", "check[all]/accuracy"]
        lines += ["", "## Token accuracy per family", "", "| family | tasks | " + " | ".join(show) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in show) + " |"]
        for f in sorted({families.get(t, "?") for t in tasks}):
            idx = [i for i, t in enumerate(tasks) if families.get(t) == f]
            lines.append(f"| {f} | {len(idx)} | " + " | ".join(f"{values(rows[s], 'accuracy')[idx].mean():.3f}" for s in show) + " |")
    return "\n".join(lines) + "\n"


def interval(a: np.ndarray, b: np.ndarray, draws: int = 10_000) -> str:
    d = a - b
    means = d[np.random.default_rng(0).integers(0, len(d), size=(draws, len(d)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return f"{d.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bank", default="default")
    p.add_argument("--suite", default="default")
    p.add_argument("--limit", type=int, default=30, help="test records per task")
    p.add_argument("--check", type=int, default=16, help="training examples a selector may look at")
    p.add_argument("--tasks", type=int, default=None, help="only the first N tasks")
    p.add_argument("--out", default="proxy.md")
    p.add_argument("--refine", choices=["also", "only"], help="also (or only, with the base, trained and embed@1) "
                   "refinement (REFINES) on the check examples")
    p.add_argument("--spread", type=int, default=1, help="every K-th task only")
    args = p.parse_args()

    from loramix.runtime.pytorch import load_model, load_tokenizer
    from loramix.runtime.lora import MixedLoRA

    bank = Bank(args.bank)
    index = BankIndex(bank)
    suite = resolve_suite(args.suite)
    names = [e.name for e in bank.usable]
    start = time.perf_counter()
    coefs = {k: loo_coefficients(index, GenerateConfig(**v)) for k, v in SOURCES.items()}
    print(f"coefficients: {time.perf_counter() - start:.1f} s", flush=True)
    cache = CACHE / f"{bank.path.name}-{len(names)}-records-{args.limit}-check-{args.check}" / (args.refine or "screen")
    cache.mkdir(parents=True, exist_ok=True)
    runner = None
    results = {}
    for t, name in list(enumerate(names[: args.tasks]))[args.spread // 2 :: args.spread]:
        file = cache / f"{name}.json"
        if file.is_file():
            cached = json.loads(file.read_text())
            want = {"base", "trained", "embed@1"} if args.refine == "only" else set(candidates(coefs, t, len(names)))
            if want | (set(REFINES) if args.refine else set()) <= set(cached):
                results[name] = cached
                continue
        if runner is None:
            model = load_model(bank.base_model)
            for prm in model.parameters():
                prm.requires_grad_(False)
            runner = {"bank": bank, "model": model, "tok": load_tokenizer(bank.base_model), "suite": suite,
                      "mixed": MixedLoRA(model, bank, bank.usable)}
        cpu = time.process_time()
        results[name] = score_task(runner, t, coefs, args.limit, args.check, args.refine)
        atomic_write_bytes(file, json.dumps(results[name]).encode())
        print(f"{name:36s} {time.process_time() - cpu:6.1f} CPU s  base {results[name]['base']['test'][1]:.3f}  "
              f"embed@1 {results[name]['embed@1']['test'][1]:.3f}  trained {results[name]['trained']['test'][1]:.3f}", flush=True)
    families = {}
    if (suite / "suite.json").is_file():
        families = {x["name"]: x["family"] for x in json.loads((suite / "suite.json").read_text())}
    text = report(results, names, families, args)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.out).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
