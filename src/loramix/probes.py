"""Stage 1 for bank entries without training data: a dataset made from what the adapter does.

Each entry answers a set of probe prompts (greedy decoding, the base model with the entry's update applied exactly);
the (prompt, answer) pairs are its dataset, signed by any signature like a train.jsonl. The answers are computed
once per bank, probe set and base model, and cached in the bank index (`BankIndex.probe_datasets`).

The default probe set (`default/probes.jsonl`) holds 48 everyday prompts written for loramix, none drawn from its
task suite: six in each of the usual categories of instruction data (open and closed questions, brainstorming,
classification, generation, extraction, rewriting, summarisation) and bare inputs (a word, a number, a sentence).
Any dataset file can replace it (`--probes FILE`, its inputs): a sample of your own inputs asks every entry what it
would answer to your task, at the cost of computing the answers again for each such file."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

from .arguments import Range, check_fields, check_seed
from .data import Dataset, Sample, read_dataset
from .errors import LoramixError

DEFAULT_PROBES = Path(__file__).parent / "default" / "probes.jsonl"
MAX_NEW_TOKENS = 32  # per answer: enough to show an adapter's output format, few enough for a 500-entry bank
# Bumped when the answers change for the same prompts, base and adapter, so cached probe datasets are recomputed.
_PROBE_VERSION = 1


@dataclass(frozen=True)
class ProbeSet:
    """The prompts every entry answers: the inputs of the dataset file `path` (None: the shipped default set), at
    most `max_samples` of them drawn with `seed` (as signatures draw their samples)."""

    path: str | Path | None = None
    max_samples: Annotated[int, Range(1, None)] | None = 128
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        check_seed("ProbeSet: ", self.seed)

    @cached_property
    def prompts(self) -> list[str]:
        data = read_dataset(self.path or DEFAULT_PROBES).subsample(self.max_samples, self.seed)
        prompts = list(dict.fromkeys(s.input for s in data if s.input.strip()))  # each prompt once
        if not prompts:
            raise LoramixError(f"{data.source}: no probe prompts (every input is empty)")
        return prompts

    def key(self, base_model: str | None, runtime: str | None = None) -> str:
        """Changes with the prompts, the base model, what runs it (`runtime`: None for PyTorch on the bank's base, else
        e.g. the GGUF file llama.cpp runs) and the answering code: `probes-<hash>`."""
        blob = {"prompts": self.prompts, "base": base_model, "tokens": MAX_NEW_TOKENS, "v": _PROBE_VERSION}
        if runtime is not None:
            blob["runtime"] = runtime
        return "probes-" + hashlib.sha256(json.dumps(blob).encode()).hexdigest()[:12]


def answer_probes(model: Any, tokenizer: Any, bank: Any, entry: Any, prompts: list[str]) -> Dataset:
    """`entry`'s greedy answers to `prompts` (at most MAX_NEW_TOKENS each), as a Dataset of (prompt, answer)
    samples. `model`: the bank's base model, unchanged on return (the entry is attached by forward hooks)."""
    import torch

    from .runtime.lora import MixedLoRA
    from .runtime.pytorch import generate_answers

    mixed = MixedLoRA(model, bank, [entry])
    try:
        mixed.weights = torch.ones(1)
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS, progress=False)
    finally:
        mixed.remove()
    return Dataset([Sample(p, (a,)) for p, a in zip(prompts, answers)], f"{entry.name} (probe answers)")


def answer_probes_llamacpp(engine: Any, bank: Any, entry: Any, prompts: list[str]) -> Dataset:
    """As answer_probes, on llama.cpp: the entry's adapter written as a GGUF LoRA for `engine`'s base (a
    runtime.llamacpp.LlamaCpp), all prompts answered in batches."""
    from .runtime.llamacpp import Lora, gguf_lora

    with gguf_lora(entry.adapter.path, engine.base, allow_pickle=bank.allow_pickle) as path:
        answers = engine.answers(prompts, lora=Lora(path), max_new_tokens=MAX_NEW_TOKENS, progress=False)
        engine.forget(Lora(path))
    return Dataset([Sample(p, (a,)) for p, a in zip(prompts, answers)], f"{entry.name} (probe answers)")


def open_answerer(base: str | None, runtime: str = "auto") -> Any:
    """A function (bank, entry, prompts) -> Dataset answering probe prompts on `base` (None: the default) as `runtime`
    runs it: answer_probes on PyTorch (on a GPU where this process has one), answer_probes_llamacpp on llama.cpp.
    Loads the base."""
    from functools import partial

    import torch

    from .runtime import choose_runtime, resolve_base

    if choose_runtime(resolve_base(base), runtime) == "llama.cpp":
        from .runtime.llamacpp import open_base

        return partial(answer_probes_llamacpp, open_base(base))
    from .runtime.pytorch import load_model, load_tokenizer

    model = load_model(base)
    return partial(answer_probes, model.to("cuda") if torch.cuda.is_available() else model, load_tokenizer(base))
