"""The held-out check's candidates as adapter files: GGUF LoRAs for llama.cpp, and PEFT folders for PyTorch when the
bank's factors mixed exactly would not fit in memory.

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


def composed_candidates(bank: Bank, coefficients: dict[str, float], candidates: dict[str, dict[str, float]],
                        scaled: dict[str, float], folder: Path, *, method: str = "exact", rank: Any = None,
                        layers: dict[int, dict[str, float]] | None = None) -> dict[str, tuple[Path, float]]:
    """label -> (a PEFT adapter folder, the scale it is applied at) for every check candidate but 'base': the
    candidates in `scaled` (label -> s: `coefficients`, with `layers` per layer, scaled by s) are one composition at
    scale s; an entry alone ('entry:<name>') is the entry's own folder at scale 1; any other is its own composition
    of candidates[label]. The compositions are written (truncated as `generate` writes them) under `folder`."""
    from ..compose import plan, write_compositions

    folders: list[Path] = []
    plans = []
    made: dict[str, tuple[Path, float]] = {}
    if any(label in scaled for label in candidates):
        folders.append(folder / "composition")
        plans.append(plan(bank, coefficients, method=method, rank=rank, layers=layers))
    for label, weights in candidates.items():
        if label in scaled:
            made[label] = (folders[0], scaled[label])
        elif label.startswith("entry:"):  # the entry alone at weight 1: its own adapter, as trained
            made[label] = (bank.entry(label.removeprefix("entry:")).adapter.path, 1.0)
        elif label != "base":
            folders.append(folder / f"candidate{len(folders)}")
            plans.append(plan(bank, weights, method=method, rank=rank))
            made[label] = (folders[-1], 1.0)
    write_compositions(folders, bank, plans, f"composing {len(plans)} check candidates")
    return made


@contextmanager
def candidate_loras(bank: Bank, coefficients: dict[str, float], candidates: dict[str, dict[str, float]],
                    scaled: dict[str, float], engine: Any, *, method: str = "exact", rank: Any = None,
                    layers: dict[int, dict[str, float]] | None = None) -> Iterator[dict[str, Lora | None]]:
    """label -> the Lora that makes check candidate `label` for the block (None for 'base'), for `engine`'s base (a
    LlamaCpp: the files' shapes are checked against it): composed_candidates as GGUF LoRAs, an entry alone the one
    kept in the bank index (BankIndex.entry_gguf), the others in a temporary folder."""
    from ..index import BankIndex

    with tempfile.TemporaryDirectory(prefix="loramix-check-") as tmp, ExitStack() as written:
        made = composed_candidates(bank, coefficients, candidates, scaled, Path(tmp), method=method, rank=rank,
                                   layers=layers)
        index = BankIndex(bank)
        files: dict[Path, Path] = {}
        loras: dict[str, Lora | None] = {}
        for label, (folder, scale) in made.items():
            if label.startswith("entry:"):
                loras[label] = Lora(index.entry_gguf(bank.entry(label.removeprefix("entry:")), engine))
                continue
            if folder not in files:
                files[folder] = written.enter_context(gguf_lora(folder, engine.base))
            loras[label] = Lora(files[folder], scale)
        yield {label: loras.get(label) for label in candidates}
