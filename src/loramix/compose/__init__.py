"""Stage 5: composition. Bank adapters and their coefficients become new adapters, module by module.

- `base`: what a composition method is (`Composer`, registered in COMPOSERS) and the factors and terms it works with;
  `exact`, `paper`: the methods, each one class declaring everything its name implies: the output's ranks and
  scales, the space a trained operator fits in, how refinement mixes it.
- `plan`: what an output will be, fixed before any tensor is read (and every refusal with it).
- `gram`: the Gram matrix of the entries' updates, which the `neural` operator fits to.
- `stream`: the one executor: N plans written in one pass over the bank's tensors (`generate` is N = 1,
  leave-one-out N = every entry), each module's factors read once and shared by the plans that use them."""

from . import exact, paper  # noqa: F401  (they register themselves in COMPOSERS)
from .base import COMPOSERS, Composer, LoraFactors, ModuleResult, Term
from .gram import gram_matrix
from .plan import Plan, plan
from .stream import Composition, compose, stream, write_composition, write_compositions

__all__ = [
    "COMPOSERS", "Composer", "Composition", "LoraFactors", "ModuleResult", "Plan", "Term", "compose", "gram_matrix", "plan",
    "stream",
    "write_composition", "write_compositions",
]
