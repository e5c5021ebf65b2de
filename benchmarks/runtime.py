"""The paper's setting on this machine's CPUs (`make bench-runtime`): a GGUF base with Mistral-7B-Instruct-v0.2's shapes
and random 4-bit weights (benchmarks/synthetic_base.py, about 4 GB) on llama.cpp, and the 500-entry synthetic bank
(benchmarks/synthetic_bank.py, indexed once), written to benchmarks/results/runtime.md.

Measured: llama.cpp's prompt and generation speed (one sequence, and 16 decoded together); `generate` with default
settings and `--base` the GGUF (its check planned by --check auto), wall and peak RSS, with what the check ran and its
cost per candidate; `eval` of 30 records with answers of up to 8 tokens; and both on PyTorch with the same base
(bfloat16 where the CPU runs it natively and float32 does not fit; refused where neither fits).
Wall times are whole processes; peak RSS is the command's own (its VmHWM). Resumable: the base, the bank and its index
are kept in $LORAMIX_HOME/bench; the measurements run again."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "benchmarks" / "results"))
N = int(os.environ.get("N", 500))
TARGETS = {"generate_s": 600, "generate_gib": 8, "eval_s": 300}


def main() -> None:
    import synthetic_base
    from speed import LORAMIX, run
    from synthetic_bank import build, records

    import llama_cpp
    import loramix
    from loramix.data import Sample

    gguf = synthetic_base.default_path()
    if not gguf.is_file():
        synthetic_base.write(gguf)
    bank = build(N)
    if not (bank / ".loramix" / "signatures").is_dir():  # index once (minutes): generate reads the entries' signatures
        subprocess.run(LORAMIX + ["bank", "index", str(bank), "--max-samples", "100"], check=True,
                       env={**os.environ, "BENCH_PEAK_FILE": os.devnull})
    work = Path(tempfile.mkdtemp(prefix="loramix-runtime-"))
    data = work / "new_task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(10**6, 100)), encoding="utf-8")
    rows: list[tuple[str, str, str, str]] = []

    # llama.cpp's own speed, in process: one example's prompt, one decoding step, 16 sequences decoded together
    from loramix.runtime.llamacpp import open_base

    start = time.perf_counter()
    with open_base(str(gguf)) as engine:
        load_s = time.perf_counter() - start
        record = records(7, 1)[0]
        sample = Sample(record["input"], tuple(record["output"]))
        speeds = [engine.speed(sample) for _ in range(3)]
        speed = sorted(speeds, key=lambda s: s.tokens_per_second)[1]
        prompts = [r["input"] for r in records(8, 16)]
        before = dict(engine.seconds), dict(engine.tokens)
        engine.answers(prompts, max_new_tokens=8, progress=False)
        gen_s = engine.seconds["generate"] - before[0]["generate"]
        gen_tokens = engine.tokens["generate"] - before[1]["generate"]
    rows += [
        ("load the GGUF (no mmap)", f"{load_s:.1f} s", "-", "in process"),
        ("prompt tokens per second (one sequence)", f"{speed.tokens_per_second:.1f}", "-", "median of 3 examples"),
        ("generation: one sequence", f"{1 / speed.seconds_per_step:.2f} tokens/s", "-", "one decoding step after a prompt"),
        ("generation: 16 sequences decoded together", f"{gen_tokens / gen_s:.2f} tokens/s", "-",
         f"{gen_tokens} tokens in {gen_s:.1f} s (the steps of a batch)"),
    ]

    # generate with default settings, the base a GGUF: the check runs on llama.cpp, planned to fit its budget
    out = work / "adapter"
    stages: list[dict[str, float]] = []
    wall, peak, _ = run(LORAMIX + ["-v", "generate", "--bank", str(bank), "--data", str(data), "--out", str(out), "--base",
                                   str(gguf), "--max-samples", "100", "--force"], 1, stages)
    report = json.loads((out / "loramix.json").read_text())
    plan, check = report.get("check_plan") or {}, report.get("check")
    per = stages[0].get("check", 0.0) / max(1, len(check["candidates"])) if check else 0.0
    rows.append(("`generate --base FILE.gguf --max-samples 100` (the bank's index), default settings", f"{wall:.1f} s",
                 f"{peak / 1024:.2f} GiB",
                 "1 run; stages: " + ", ".join(f"{k} {v:.1f}" for k, v in stages[0].items())))
    rows.append(("the check it ran (`--check auto`, budget 120 s)",
                 f"{stages[0].get('check', 0.0):.1f} s", "-",
                 f"{plan.get('mode')}: {plan.get('why')}" + (f"; {len(check['candidates'])} candidates, "
                                                            f"{per:.1f} s each, kept {check['chosen']}" if check else "")))

    # eval of 30 records, answers of up to 8 tokens, base + the adapter written above
    test = work / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in records(10**6 + 1, 30)), encoding="utf-8")
    wall_e, peak_e, _ = run(LORAMIX + ["eval", "--data", str(test), "--adapter", str(out), "--base", str(gguf),
                                       "--max-new-tokens", "8"], 1)
    rows.append(("`eval` of 30 records, answers of up to 8 tokens (base + adapter, llama.cpp)", f"{wall_e:.1f} s",
                 f"{peak_e / 1024:.2f} GiB", "1 run"))

    # the same on PyTorch: float32 if it fits, else bfloat16 where the CPU runs it natively (decided before loading)
    for label, cmd, stages_t in (
        ("`generate --runtime torch`, otherwise the same", ["-v", "generate", "--bank", str(bank), "--data", str(data),
                                                            "--out", str(work / "adapter_torch"), "--base", str(gguf),
                                                            "--max-samples", "100", "--force"], []),
        ("`eval` of the same 30 records on PyTorch", ["eval", "--data", str(test), "--adapter", str(out), "--base",
                                                      str(gguf), "--max-new-tokens", "8"], None),
    ):
        try:
            wall_t, peak_t, _ = run(LORAMIX + cmd + ["--runtime", "torch"], 1, stages_t)
        except RuntimeError as e:  # a one-line refusal (exit 1), or a crash (killed: out of memory)
            said = [line for line in str(e).splitlines() if line.startswith("error:")]
            rows.append((f"{label} (PyTorch)", "refused" if said else "failed", "-",
                         said[-1][:300] if said else f"no result ({str(e).splitlines()[0][:120]}; see dmesg)"))
            break
        note = "1 run"
        if stages_t:
            torch_report = json.loads((work / "adapter_torch" / "loramix.json").read_text())
            tplan = torch_report.get("check_plan") or {}
            note += "; stages: " + ", ".join(f"{k} {v:.1f}" for k, v in stages_t[0].items())
            note += f"; check {tplan.get('mode')}: {tplan.get('why')}"
        rows.append((f"{label} (PyTorch, {torch_dtype_name(gguf)})", f"{wall_t:.1f} s", f"{peak_t / 1024:.2f} GiB", note))

    met = {"generate_s": wall <= TARGETS["generate_s"], "generate_gib": peak / 1024 <= TARGETS["generate_gib"],
           "eval_s": wall_e <= TARGETS["eval_s"]}
    lines = [
        "# The paper's setting: a 7B GGUF base on llama.cpp",
        "",
        f"Reproduce: `make bench-runtime` (`N={N}`). Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; llama-cpp-python "
        f"{llama_cpp.__version__} (portable build: GGML_NATIVE=OFF, AVX2, FMA, F16C), loramix {loramix.__version__}.",
        "",
        f"Base: {gguf.name}, {gguf.stat().st_size / 2**30:.2f} GiB: Mistral-7B-Instruct-v0.2's shapes with random Q4_0 "
        "weights and SmolLM2's 49,152-token vocabulary (its answers are noise; its cost per token is a 7B model's). "
        f"Bank: {N} synthetic adapters with the same shapes (rank 16 on q, k, v of 32 layers), indexed.",
        "",
        "| what | time | peak RSS | note |",
        "| --- | ---: | ---: | --- |",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        "## Targets (2 cores, 24 GB)",
        "",
        f"- `generate` with default settings <= {TARGETS['generate_s'] // 60} minutes: "
        f"{'met' if met['generate_s'] else 'missed'} ({wall:.0f} s).",
        f"- its peak RSS <= {TARGETS['generate_gib']} GB: {'met' if met['generate_gib'] else 'missed'} "
        f"({peak / 1024:.2f} GiB).",
        f"- `eval` of 30 records with answers of up to 8 tokens <= {TARGETS['eval_s'] // 60} minutes: "
        f"{'met' if met['eval_s'] else 'missed'} ({wall_e:.0f} s).",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtime.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def torch_dtype_name(gguf: Path) -> str:
    """The dtype loramix loads `gguf` in on PyTorch on this machine now (runtime.torch_dtype), or 'refused'."""
    from loramix.errors import LoramixError
    from loramix.runtime.pytorch import load_config
    from loramix.runtime.memory import torch_dtype

    try:
        return str(torch_dtype(load_config(str(gguf)), "base", extra=gguf.stat().st_size)).removeprefix("torch.")
    except LoramixError:
        return "refused"


if __name__ == "__main__":
    main()
