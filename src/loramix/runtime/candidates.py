"""The held-out check's candidates as GGUF LoRA adapters for llama.cpp.

On PyTorch the check mixes the bank's factors exactly with forward hooks; llama.cpp applies adapter files at runtime
scales instead. So the candidates become files, each written once: the composition (truncated as `generate` writes
it) serves every scaled candidate 'x<s>' as one adapter at scale s, without reloading; an entry alone
('entry:<name>') is the entry's own adapter, converted once and kept in the bank index; 'top<k>' is its own
composition; 'base' is no adapter. What is scored is what would be written."""

from __future__ import annotations

import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..bank import Bank
from .llamacpp import Lora, gguf_lora


@contextmanager
def candidate_loras(bank: Bank, coefficients: dict[str, float], candidates: dict[str, dict[str, float]],
                    scaled: dict[str, float], engine: Any, *, method: str = "exact", rank: Any = None,
                    layers: dict[int, dict[str, float]] | None = None) -> Iterator[dict[str, Lora | None]]:
    """label -> the Lora that makes check candidate `label` for the block (None for 'base'), for `engine`'s base (a
    LlamaCpp: the files' shapes are checked against it). `scaled`: label -> s for the candidates that are
    `coefficients` (with `layers`, per layer) scaled by s, one composition applied at scale s; an entry alone is
    BankIndex.entry_gguf; every other candidate is its own composition of candidates[label], in a temporary folder."""
    from ..compose import plan, write_compositions
    from ..index import BankIndex

    with tempfile.TemporaryDirectory(prefix="loramix-check-") as tmp, ExitStack() as written:
        folders: list[Path] = []
        plans = []
        made: dict[str, tuple[int, float]] = {}  # label -> (its composition, its scale)
        if any(label in scaled for label in candidates):
            folders.append(Path(tmp) / "composition")
            plans.append(plan(bank, coefficients, method=method, rank=rank, layers=layers))
        for label, weights in candidates.items():
            if label in scaled:
                made[label] = (0, scaled[label])
            elif label != "base" and not label.startswith("entry:"):
                folders.append(Path(tmp) / f"candidate{len(folders)}")
                plans.append(plan(bank, weights, method=method, rank=rank))
                made[label] = (len(plans) - 1, 1.0)
        write_compositions(folders, bank, plans, f"composing {len(plans)} check candidates")
        files = [written.enter_context(gguf_lora(folder, engine.base)) for folder in folders]
        loras: dict[str, Lora | None] = {label: Lora(files[i], s) for label, (i, s) in made.items()}
        index = BankIndex(bank)
        for label in candidates:
            if label.startswith("entry:"):  # the entry alone at weight 1: its own adapter, as trained
                loras[label] = Lora(index.entry_gguf(bank.entry(label.removeprefix("entry:")), engine))
        yield {label: loras.get(label) for label in candidates}
