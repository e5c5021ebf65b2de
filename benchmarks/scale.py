"""`make bench-scale`: the leave-one-out benchmark on a subset of the default bank with the local engine and
with 1 and 2 workers of a local Ray cluster, and from those figures an estimate for the paper's 502-task
Lots-of-LoRAs leave-one-out on a cluster. Writes benchmarks/results/scale.md."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "benchmarks" / "results"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import composition_setting  # noqa: E402

SETTINGS = ["uniform", "paper/unigram-kl-attentional", composition_setting().name]


def run(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=8, help="tasks of the subset")
    p.add_argument("--limit", type=int, default=20, help="test records per task")
    args = p.parse_args()
    common = ["--tasks", str(args.tasks), "--limit", str(args.limit), "--quick", "--only", *SETTINGS]
    # one explicit auth mode for the cluster and its clients: unset, `ray start` turns token auth on whenever
    # ~/.ray/auth_token exists, and a client given an address does not
    env = {**os.environ, "LORAMIX_PROGRESS": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    work = Path(tempfile.mkdtemp(prefix="loramix-scale-"))
    # signatures and distance matrices are cached in the bank index by a first run, so every timed run below
    # measures the same work: coefficients, composition, generation and scoring per task
    run(common + ["--tasks", "1"], {**env, "BENCH_CACHE": str(work / "warm"), "BENCH_RESULTS": str(work / "r")})
    rows = []
    seconds = run(common, {**env, "BENCH_CACHE": str(work / "local"), "BENCH_RESULTS": str(work / "r")})
    rows.append(("local engine (1 process)", seconds))
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    out = subprocess.run([ray_bin, "start", "--head", "--num-cpus", "2", "--include-dashboard", "false", "--port", "0",
                          "--object-store-memory", str(200 * 2**20)], capture_output=True, text=True, env=env)
    address = next(line.split("'")[1] for line in (out.stdout + out.stderr).splitlines() if "address='" in line)
    try:
        for workers in (1, 2):
            seconds = run(common + ["--engine", "ray", "--workers", str(workers)],
                          {**env, "RAY_ADDRESS": address, "BENCH_CACHE": str(work / f"ray{workers}"), "BENCH_RESULTS": str(work / "r")})
            rows.append((f"ray engine, {workers} worker{'s' if workers > 1 else ''} (1 CPU each)", seconds))
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env)
    shutil.rmtree(work)

    evals = args.tasks * (len(SETTINGS) + 2)  # + base and trained
    local, one, two = (s for _, s in rows)
    efficiency = one / (2 * two)
    paper_evals = 502 * (12 + 3)  # 12 settings, base, trained, uniform per task
    paper_minutes = 32 * 48 * 60 / paper_evals  # the paper: 32 GPUs for two days
    lines = [
        "# Scaling the leave-one-out benchmark out with Ray",
        "",
        f"Reproduce: `make bench-scale`. Machine: {platform.machine()}, {os.cpu_count()} CPUs. Subset: the first {args.tasks} tasks "
        f"of the default bank, {args.limit} test records each, {len(SETTINGS)} settings ({', '.join(SETTINGS)}) plus base and "
        f"trained: {evals} evaluations (compose, generate, score). Signatures and distance matrices were cached beforehand.",
        "",
        "| engine | wall (s) | per evaluation (s) | speed-up vs 1 Ray worker |",
        "| --- | ---: | ---: | ---: |",
        *[f"| {name} | {s:.0f} | {s / evals:.1f} | {one / s:.2f}x |" for name, s in rows],
        "",
        f"Parallel efficiency from 1 to 2 workers: {efficiency:.2f} (two workers share this machine's two cores, and the "
        f"driver composes while they generate). Ray's own cost over the local engine: {one / local:.2f}x for one worker "
        "(actor start-up, the base model loaded once per actor, results shipped back to the driver).",
        "",
        "## Estimate for the paper's leave-one-out (502 Lots-of-LoRAs tasks, Mistral-7B-Instruct-v0.2)",
        "",
        f"The paper's evaluation took 32 GPUs for two days for 502 tasks with 12 settings, about {paper_evals} evaluations "
        f"counting base, trained and one reference per task: about {paper_minutes:.0f} GPU-minutes per evaluation (generation "
        "dominates; loramix's composition of all 502 predicted adapters takes minutes on 2 CPU cores, see speed.md). The work "
        "items are independent, so with W GPU workers at the efficiency measured here the wall time is about "
        f"{paper_evals} x {paper_minutes:.0f} min / (W x {efficiency:.2f}):",
        "",
        "| GPU workers (one Ray actor each) | estimated wall time |",
        "| ---: | ---: |",
        *[f"| {w} | {paper_evals * paper_minutes / (w * efficiency) / 60:.1f} h |" for w in (8, 32, 64, 128)],
        "",
        "Each actor loads the base model once and then only swaps adapters; a lost worker costs its own tasks, "
        "which a rerun redoes (finished results are kept).",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
