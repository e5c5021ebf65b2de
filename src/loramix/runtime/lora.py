"""Bank LoRAs attached to a PyTorch base at given weights (`MixedLoRA`): the composition a check, a calibration, a
weight search or the neural-answer operator scores, applied exactly by forward hooks, nothing composed or written."""

from __future__ import annotations

from typing import Any, Sequence

from ..adapter import layer_of
from ..errors import LoramixError


def bank_layers(bank: Any) -> list[int]:

    """The layer indices of the bank's modules, sorted: the rows of per-layer weights [layers, k]."""
    return sorted({layer_of(m) for m in bank.shapes})


class MixedLoRA:
    """Attaches k bank LoRAs to a base model through forward hooks: each adapted linear module's output gains the
    composition method's mix of them (Composer.mix: sum_i w_i s_i B_i (A_i x) for 'exact'; LoraHub's A-and-B
    average for 'paper'). `weights` is a tensor that the hooks read at every call (differentiable): [k], one weight
    per entry, or [len(layers), k], one per layer and entry (`layers`: the modules' layer indices, `layer_of`)."""

    def __init__(self, model: Any, bank: Any, entries: Sequence[Any], method: str = "exact"):
        import torch

        from ..compose import COMPOSERS
        from ..compose.base import LoraFactors

        self.composer = COMPOSERS.get(method)()
        if not self.composer.refinable:
            raise LoramixError(f"composition '{method}' cannot be refined")
        self.composer.check(entries)
        self.model = model
        self.weights = torch.zeros(len(entries), dtype=torch.float32)
        self.layers = bank_layers(bank)
        self._hooks = []
        for name in sorted(bank.shapes):
            parts = [(i, e.adapter.modules[name], LoraFactors.stored(e, name)) for i, e in enumerate(entries)
                     if name in e.adapter.modules]
            if not parts:
                continue
            a = torch.cat([f.a.float() for _, _, f in parts])  # [R, in]
            b = torch.cat([m.scale * f.b.float() for _, m, f in parts], dim=1)  # [out, R]
            owner = torch.cat([torch.full((m.rank,), i) for i, m, _ in parts])  # entry of each rank-1 piece
            module = model.get_submodule(name)
            device = module.weight.device  # the bank's factors beside the module they adapt (CPU or a GPU)
            group = self.layers.index(layer_of(name))
            self._hooks.append(module.register_forward_hook(
                self._hook(a.to(device), b.to(device), owner.to(device), len(parts), group)))

    def _hook(self, a: Any, b: Any, owner: Any, k: int, group: int):
        def add(module: Any, inputs: tuple, output: Any) -> Any:
            w = (self.weights if self.weights.dim() == 1 else self.weights[group]).to(a.device)
            delta = self.composer.mix(inputs[0].to(a.dtype), a, b, w[owner], k)
            return output + delta.to(output.dtype)

        return add

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
