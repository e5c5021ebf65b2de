"""Speed and memory at the paper's scale (`make bench-speed`): a 500-entry bank with Mistral-7B-Instruct-v0.2
shapes (benchmarks/synthetic_bank.py), measured on this machine, written to benchmarks/results/speed.md.

Each figure is the median of RUNS runs (LOO and the paper's way: one run, said in the table). Wall times are
whole processes (imports included) unless the row says otherwise; peak RSS is the command's own peak (its VmHWM)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "benchmarks" / "results"))
# A benchmarked Python command writes its own peak RSS (VmHWM, which exec resets) to $BENCH_PEAK_FILE at exit: the
# rusage of a child of this (large) process would count this process's size as the child's peak.
_PEAK = ("import atexit, os; atexit.register(lambda: open(os.environ['BENCH_PEAK_FILE'], 'w')"
         ".write(open('/proc/self/status').read()))\n")


def python(code: str) -> list[str]:
    """A command running `code` in a new interpreter that reports its peak RSS to `run`."""
    return [sys.executable, "-c", _PEAK + code]


LORAMIX = python("from loramix.cli import main; main()")


def run(cmd: list[str], runs: int, stages: list[dict[str, float]] | None = None) -> tuple[float, float, list[float]]:
    """Median wall seconds and median peak RSS (MiB) of `cmd` over `runs` runs, and the walls. With `stages`, each
    run's `generate` stage seconds (its -v log line) are appended to it."""
    walls, peaks = [], []
    for _ in range(runs):
        with tempfile.NamedTemporaryFile(suffix=".status") as peak:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={
                **os.environ, "LORAMIX_PROGRESS": "0", "COLUMNS": "1000", "BENCH_PEAK_FILE": peak.name})
            err = proc.stderr.read().decode()
            status = proc.wait()
            walls.append(time.perf_counter() - start)
            status_lines = Path(peak.name).read_text().splitlines()
        if status != 0:
            raise RuntimeError(f"exit {status}: {' '.join(cmd[3:])} failed\n{err[-2000:]}")
        peaks.append(int(next(x for x in status_lines if x.startswith("VmHWM:")).split()[1]) / 1024)  # kB -> MiB
        if stages is not None:
            line = next(x for x in err.splitlines() if "seconds per stage: " in x).split("seconds per stage: ", 1)[1].strip()
            stages.append({k: float(v) for k, v in (part.rsplit(" ", 1) for part in line.split(", "))})
    return statistics.median(walls), statistics.median(peaks), walls


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (root only), so that the next run reads the bank from disk."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def breakdown(stages: list[dict[str, float]], imports: float, wall: float) -> str:
    """'stage median s, ...' over runs, then the imports and what is left of the wall (interpreter, CLI, exit)."""
    from loramix.pipeline import STAGES

    med = {k: statistics.median(r.get(k, 0.0) for r in stages) for k in STAGES if any(k in r for r in stages)}
    med = {k: v for k, v in med.items() if v >= 0.005}
    rest = wall - imports - sum(med.values())
    return ", ".join([f"imports {imports:.2f}", *(f"{k} {v:.2f}" for k, v in med.items()), f"other {rest:.2f}"])


def timed(fn, runs: int) -> tuple[float, object]:
    """Median seconds of fn() over `runs` calls, and the last result."""
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def peft_comparison(bank_dir: Path, n: int, rank: int, runs: int, peft_runs: int, layers: int) -> dict:
    """loramix exact composition vs PEFT add_weighted_adapter(combination_type='svd') on the same n adapters
    (their first `layers` layers: PEFT's dense SVD costs about 15 s per 4096 x 4096 module on 2 cores), weights
    and output rank: median seconds of each and relative Frobenius error against the dense exact sum."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from safetensors.torch import save_file

    import loramix
    from loramix.compose import compose
    from synthetic_bank import HIDDEN, KV

    sub = Path(tempfile.mkdtemp(prefix="peft-cmp-"))
    keep = tuple(f".layers.{i}." for i in range(layers))
    for e in sorted(bank_dir.glob("task*"))[:n]:
        (sub / e.name).mkdir()
        with safe_open(e / "adapter_model.safetensors", framework="pt") as f:
            save_file({k: f.get_tensor(k) for k in f.keys() if any(x in k for x in keep)}, sub / e.name / "adapter_model.safetensors")
        for other in ("adapter_config.json", "train.jsonl"):
            shutil.copy(e / other, sub / e.name / other)
    bank = loramix.Bank(sub)
    weights = np.random.default_rng(0).dirichlet(np.ones(n))
    coefs = {e.name: float(w) for e, w in zip(bank.entries, weights)}

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(HIDDEN, HIDDEN, bias=False)
            self.k_proj = torch.nn.Linear(HIDDEN, KV, bias=False)
            self.v_proj = torch.nn.Linear(HIDDEN, KV, bias=False)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attention()

    class Inner(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(Layer() for _ in range(layers))

    class Skeleton(torch.nn.Module):  # Mistral's module names, attention projections only
        def __init__(self):
            super().__init__()
            self.model = Inner()

    with torch.device("meta"):
        skeleton = Skeleton()
    skeleton = skeleton.to_empty(device="cpu")
    model = get_peft_model(skeleton, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj"]), adapter_name="init")
    for e in bank.entries:
        model.load_adapter(str(e.adapter.path), adapter_name=e.name)
    names = [e.name for e in bank.entries]

    def peft_svd():
        if "combined" in model.peft_config:
            model.delete_adapter("combined")
        model.add_weighted_adapter(names, [coefs[x] for x in names], "combined", combination_type="svd", svd_rank=rank)

    def ours():
        return compose(bank, coefs, rank=rank, dtype=torch.float32)

    t_peft, _ = timed(peft_svd, peft_runs)
    t_ours, comp = timed(ours, runs)
    err_peft = err_ours = total = 0.0
    modules = {n.removeprefix("base_model.model."): m for n, m in model.named_modules() if hasattr(m, "lora_A") and "combined" in m.lora_A}
    for name in sorted(bank.shapes):
        exact = torch.zeros(bank.shapes[name], dtype=torch.float64)
        for e in bank.entries:
            exact += coefs[e.name] * e.adapter.delta(name)
        a, b = comp.factors[name]
        ours_delta = comp_scale(comp.config, name) * (b.double() @ a.double())
        peft_delta = modules[name].get_delta_weight("combined").double()
        total += float(exact.pow(2).sum())
        err_ours += float((ours_delta - exact).pow(2).sum())
        err_peft += float((peft_delta - exact).pow(2).sum())
    shutil.rmtree(sub)
    return {"n": n, "layers": layers, "rank": rank, "peft_s": t_peft, "ours_s": t_ours, "err_peft": (err_peft / total) ** 0.5, "err_ours": (err_ours / total) ** 0.5}


def comp_scale(config: dict, module: str) -> float:
    from loramix.adapter import pattern_value

    r = pattern_value(config["rank_pattern"], module, config["r"])
    alpha = pattern_value(config["alpha_pattern"], module, config["lora_alpha"])
    return alpha / (r**0.5 if config["use_rslora"] else r)


def paper_way(bank_dir: Path, n: int) -> dict:
    """The paper's composition: every adapter flattened into one row of W [n, P], new adapters = C @ W."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    entries = sorted(bank_dir.glob("task*"))[:n]
    start = time.perf_counter()
    rows = []
    for e in entries:
        t = load_file(e / "adapter_model.safetensors")
        rows.append(torch.cat([t[k].flatten() for k in sorted(t)]))
    w = torch.stack(rows)
    del rows
    t_load = time.perf_counter() - start
    c = torch.as_tensor(np.random.default_rng(0).dirichlet(np.ones(n), size=n), dtype=torch.float32)
    start = time.perf_counter()
    out = c @ w
    t_mm = time.perf_counter() - start
    return {"n": n, "matrix_gb": w.numel() * 4 / 1e9, "load_s": t_load, "matmul_s": t_mm, "out_gb": out.numel() * 4 / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=int(os.environ.get("N", 500)))
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--index-runs", type=int, default=1, help="runs of `bank index` (minutes each)")
    p.add_argument("--paper-n", type=int, default=50, help="entries for the paper's flattened C @ W")
    p.add_argument("--peft-runs", type=int, default=1, help="runs of PEFT's svd combination (minutes each)")
    p.add_argument("--peft-layers", type=int, default=4, help="layers of the 20 adapters in the PEFT comparison")
    p.add_argument("--no-loo", dest="loo", action="store_false", help="skip `bank loo` (all N adapters written)")
    args = p.parse_args()

    from synthetic_bank import build, records

    import loramix
    import peft
    import torch
    import transformers

    bank = build(args.n)
    work = Path(tempfile.mkdtemp(prefix="loramix-speed-"))
    data = work / "new_task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(10**6, 100)), encoding="utf-8")
    rows: list[tuple[str, str, str, str]] = []  # what, wall, peak RSS, note

    # bank index: embed signatures, 100 samples per entry (cache removed before each run)
    def index_cmd() -> list[str]:
        shutil.rmtree(bank / ".loramix" / "signatures", ignore_errors=True)
        return LORAMIX + ["bank", "index", str(bank), "--max-samples", "100"]

    walls, peaks = [], []
    for _ in range(args.index_runs):
        w, pk, _ = run(index_cmd(), 1)
        walls.append(w)
        peaks.append(pk)
    rows.append((f"`bank index` ({args.n} entries, embed-io: the inputs and outputs of 100 samples each)", f"{statistics.median(walls):.1f} s", f"{statistics.median(peaks):.0f} MiB", f"median of {args.index_runs}"))

    # distance matrices between all entries
    from loramix import Bank, BankIndex, SignatureSpec
    from loramix.distances import distance_matrix

    index = BankIndex(Bank(bank))
    sigs = index.signatures(SignatureSpec(max_samples=100))  # generate's signature (embed-io: [100, 768] per entry)
    for name in ("sliced", "w2", "mmd-rbf", "gaussian-w2"):
        seconds, _ = timed(lambda: distance_matrix(name, sigs), 1)
        note = "in process, 1 run"
        if seconds < 60 and args.runs > 1:  # under a minute: the median of `runs`
            times = [seconds] + [timed(lambda: distance_matrix(name, sigs), 1)[0] for _ in range(args.runs - 1)]
            seconds, note = statistics.median(times), f"in process, median of {args.runs}: " + ", ".join(f"{x:.1f}" for x in times)
        rows.append((f"{args.n} x {args.n} distance matrix, `{name}`", f"{seconds:.1f} s", "-", note))

    # generate against the indexed bank, exact composition to rank 16, without the held-out check (the synthetic
    # entries have no base model to run; the check's cost is the base model's forward passes, see quality.md)
    imports, _, _ = run(python("import loramix.cli"), args.runs)
    rows.append(("`import loramix.cli` (torch, numpy, typer; not transformers)", f"{imports:.2f} s", "-", f"median of {args.runs}"))
    stage_rows = []
    for top_k in (None, 16):
        out = work / f"gen-{top_k}"
        cmd = LORAMIX + ["-v", "generate", "--bank", str(bank), "--data", str(data), "--out", str(out), "--rank", "16",
                         "--max-samples", "100", "--force", "--check", "0"]
        if top_k:
            cmd += ["--top-k", str(top_k)]
        what = "default settings: all " + str(args.n) + " entries" if top_k is None else "top-k 16"
        if drop_page_cache():  # cold: the bank's files from disk
            wall, peak, _ = run(cmd, 1)
            rows.append((f"`generate --check 0` ({what}), cold page cache", f"{wall:.1f} s", f"{peak:.0f} MiB", "1 run, after dropping the page cache"))
        run(cmd, 1)  # warms the page cache
        stages: list[dict[str, float]] = []
        wall, peak, walls = run(cmd, args.runs, stages)
        rows.append((f"`generate --check 0` ({what})", f"{wall:.1f} s", f"{peak:.0f} MiB", f"median of {args.runs}: " + ", ".join(f"{x:.1f}" for x in walls)))
        stage_rows.append((what, wall, breakdown(stages, imports, wall)))

    # leave-one-out for every entry, top-k 16, adapters written
    from loramix.config import GenerateConfig
    from loramix.bank_operator import loo_coefficients

    cfg = GenerateConfig(top_k=16, rank=16, max_samples=100)
    seconds, _ = timed(lambda: loo_coefficients(index, cfg), args.runs)
    rows.append((f"leave-one-out coefficients, all {args.n} entries", f"{seconds:.2f} s", "-", f"in process, median of {args.runs}, distance matrix cached"))
    if args.loo:
        loo_out = work / "loo"
        wall, peak, _ = run(LORAMIX + ["bank", "loo", str(bank), "--out", str(loo_out), "--top-k", "16", "--rank", "16", "--max-samples", "100"], 1)
        written = sum(f.stat().st_size for f in loo_out.rglob("adapter_model.safetensors")) / 1e9
        rows.append((f"`bank loo`: {args.n} adapters predicted and written (top-k 16)", f"{wall:.0f} s", f"{peak:.0f} MiB", f"1 run, {written:.1f} GB written"))
        shutil.rmtree(loo_out)
    else:
        rows.append((f"`bank loo`: {args.n} adapters predicted and written (top-k 16)", "not run", "-", "`--no-loo`"))

    cmp = peft_comparison(bank, min(20, args.n), 16, args.runs, args.peft_runs, args.peft_layers)
    paper = paper_way(bank, args.paper_n)
    shutil.rmtree(work)

    lines = [
        "# Speed and memory at the paper's scale",
        "",
        f"Reproduce: `make bench-speed` (`N={args.n}`). Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, loramix {loramix.__version__}.",
        "",
        f"Bank: {args.n} synthetic adapters with Mistral-7B-Instruct-v0.2 shapes (32 layers, q_proj 4096 x 4096, k_proj and "
        "v_proj 1024 x 4096, rank 16, alpha 32, float32: 37.8 MB each), each with 100 training samples.",
        "",
        "| what | wall | peak RSS | note |",
        "| --- | ---: | ---: | --- |",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        "Warm page cache unless the row says otherwise. Exact composition of more than 1,024 stacked ranks (all 500 "
        "entries: 8,000) is a randomized range finder over every entry's factors, read module by module. What bounds "
        "the rows above their targets (the encoder's arithmetic, the per-pair steps of the distances, the composition "
        "per module, how dense the default weights are) and what was tried: `speed-floors.md`, which `make bench-speed` "
        "writes next.",
        "",
        f"## Where `generate`'s time goes (seconds, medians of {args.runs} runs)",
        "",
        "`imports`: `import loramix.cli` in its own process; the stages are those `generate -v` logs (`pipeline.STAGES`: "
        "open = the bank and the dataset opened and checked, signature = the dataset's, with the encoder's load, distances "
        "= reading the entries' cached signatures and the distance row, compose = composing and writing); other = the "
        "rest of the process's wall (interpreter start, option parsing, exit).",
        "",
        "| setting | wall | breakdown |",
        "| --- | ---: | --- |",
        *[f"| {a} | {b:.1f} | {c} |" for a, b, c in stage_rows],
        "",
        f"## Exact composition against PEFT, {cmp['n']} adapters (their first {cmp['layers']} layers: "
        f"{3 * cmp['layers']} modules), output rank {cmp['rank']}",
        "",
        f"| method | seconds (median of {args.runs} for loramix, {args.peft_runs} for PEFT) | relative Frobenius error vs the exact weighted sum |",
        "| --- | ---: | ---: |",
        f"| loramix `exact` (per-entry QR, Gram matrices of the stacks, SVD of the core; reads the adapters from disk) | {cmp['ours_s']:.2f} | {cmp['err_ours']:.3e} |",
        f"| PEFT `add_weighted_adapter(combination_type='svd')` (adapters already in memory) | {cmp['peft_s']:.2f} | {cmp['err_peft']:.3e} |",
        "",
        f"Speed ratio: {cmp['peft_s'] / cmp['ours_s']:.1f}x. The error of a rank-{cmp['rank']} result against the exact sum "
        "is the tail of its spectrum: equal errors mean both found the optimal truncation.",
        "",
        f"## The paper's way: all adapters flattened into one matrix, C @ W ({paper['n']} entries)",
        "",
        f"Building W ({paper['n']} x 9.4 M float32, {paper['matrix_gb']:.2f} GB) took {paper['load_s']:.1f} s and C @ W for all "
        f"{paper['n']} rows {paper['matmul_s']:.2f} s (output {paper['out_gb']:.2f} GB, in memory). At 500 entries W alone is "
        f"{paper['matrix_gb'] * 500 / paper['n']:.1f} GB, the paper's 19 GB; loramix never holds more than one module of the "
        "bank at a time.",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
