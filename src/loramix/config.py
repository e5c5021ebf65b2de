"""`generate`'s configuration: the single source of truth for its choices. Each field carries its help text
(the CLI's options are generated from it) and is validated in `__post_init__` against the registries, so an
invalid choice is refused when the configuration is made, before any work is done."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .adapter import DTYPES
from .compose import COMPOSERS
from .distances import DISTANCES, get_distance
from .errors import LoramixError
from .operators import OPERATORS
from .refine import CRITERIA, SEARCHES
from .signatures import SIGNATURES, SignatureSpec

DTYPE_NAMES = tuple(DTYPES)  # the output dtypes generate writes


def _names(registry) -> str:
    return ", ".join(registry.names())


def _distance_help() -> str:
    """The distances grouped by the signatures they compare, e.g. 'wd, kl (unigram); w2, sliced (embed, hidden)'."""
    groups = []
    for kind in dict.fromkeys(DISTANCES.get(n).kind for n in DISTANCES.names()):
        dists = [n for n in DISTANCES.names() if DISTANCES.get(n).kind == kind]
        sigs = [n for n in SIGNATURES.names() if SIGNATURES.get(n).kind == kind]
        groups.append(f"{', '.join(dists)} ({', '.join(sigs)})")
    return "; ".join(groups)


def option(default, help: str, *, flag: str | None = None, method: bool = True):
    """A configuration field: its default, help text, CLI flag (default --<name>) and whether it is one of the
    method options that `generate` and `bank loo` share (`method`)."""
    return field(default=default, metadata={"help": help, "flag": flag, "method": method})


@dataclass
class GenerateConfig:
    """Every choice `generate` makes (see each field's help). Validated on creation; `dataclasses.replace`
    re-validates."""

    signature: str = option(SignatureSpec.method, f"Dataset signature: {_names(SIGNATURES)}.")
    distance: str = option("gaussian-w2", f"Distance between signatures: {_distance_help()}.")
    operator: str = option("normalized", f"Meta-operator: {_names(OPERATORS)}.")
    compose: str = option("exact", f"Composition: {_names(COMPOSERS)} (exact: the sum of updates; paper: A and B "
                          "averaged).")
    rank: int | str | None = option(None, "Output rank: an integer, or 'full'. Default: the bank's largest rank.")
    top_k: int | None = option(None, "Keep only the k largest coefficients.")
    temperature: float = option(1.0, "Softmin temperature (larger: flatter weights).")
    seed: int = option(0, "Seed for subsampling, sliced projections and MMD draws.")
    max_samples: int | None = option(SignatureSpec.max_samples, "At most this many samples per dataset for signatures.")
    model: str | None = option(None, "Embedding model (embed) or base model (unigram, hidden) override.")
    scale: float = option(1.0, "Global scale of the composed update: the coefficients sum to it.")
    calibration: bool = option(False, "Use the bank's calibration (`loramix bank calibrate`) when it has one for this "
                               "setting: its temperature, top-k and scale replace those options. Off by default: "
                               "on the 53 leave-one-out tasks it lowered ROUGE-L (README, Quality).")
    dtype: str | None = option(None, f"Output dtype: {', '.join(DTYPE_NAMES)} (default: the bank's).", method=False)
    check: int = option(16, "Hold out this many examples of DATA and keep, of the base model, the composed update at "
                        "scales 0.5 to 2, its top entries (--check-tops) and the top entries alone (--check-singles), the one the held-out examples "
                        "prefer (--check-criterion). Loads the base model and runs forward passes only; 0: no check "
                        "(the composition as the operator gives it, without loading the base).", method=False)
    check_singles: int = option(4, "With --check: also try each of the top this-many entries alone.", method=False)
    check_tops: int = option(0, "With --check: also try the composition kept to its top 2, ..., this-many entries "
                             "(rescaled to its total weight).", method=False)
    check_criterion: str = option("accuracy", "With --check: rank candidates by 'loss' (answer loss), 'accuracy' "
                                  "(teacher-forced token accuracy, then loss) or 'exact' (examples whose whole answer "
                                  "is the most likely continuation, then accuracy, then loss).", method=False)
    refine: int = option(0, "Refine the top entries' weights on this many examples of DATA (loads the base).",
                         method=False)
    refine_method: str = option("gradient", f"Refinement search: {_names(SEARCHES)} (gradient: the k weights by "
                                "backpropagation).", method=False)
    finetune: int = option(0, "Train the composed adapter itself on this many examples of DATA: its LoRA factors, "
                           "from the composition (from scratch when the check kept the base), with `loramix train`'s "
                           "optimizer, after the check and on examples it did not see (loads the base).", method=False)
    refine_budget: float | None = option(None, "Seconds the refinement (--refine; --finetune, each) may take (no step "
                                         "starts that would end past them).", flag="--budget", method=False)
    refine_per_layer: bool = option(True, "With --refine: one weight per entry and layer (the layers composed apart); "
                                    "--no-refine-per-layer: one weight per entry.", method=False)

    def __post_init__(self) -> None:
        kind = SIGNATURES.get(self.signature).kind
        get_distance(self.distance, kind)
        OPERATORS.get(self.operator)
        composer = COMPOSERS.get(self.compose)
        if isinstance(self.rank, str) and self.rank != "full":
            try:
                self.rank = int(self.rank)
            except ValueError:
                raise LoramixError(f"rank must be an integer or 'full', got {self.rank!r}") from None
        composer.validate(self.rank)
        _at_least("top-k", self.top_k, 1)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise LoramixError(f"temperature must be positive and finite, got {self.temperature}")
        _at_least("max-samples", self.max_samples, 1)
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise LoramixError(f"scale must be positive and finite, got {self.scale}")
        if not (isinstance(self.check, int) and self.check >= 0):
            raise LoramixError(f"--check takes a number of examples, got {self.check}")
        _at_least("check-singles", self.check_singles, 0)
        _at_least("check-tops", self.check_tops, 0)
        if self.check_criterion not in CRITERIA:
            raise LoramixError(f"--check-criterion must be one of {', '.join(CRITERIA)}, got {self.check_criterion!r}")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise LoramixError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if not (isinstance(self.refine, int) and self.refine >= 0):
            raise LoramixError(f"--refine takes a number of examples, got {self.refine}")
        SEARCHES.get(self.refine_method)
        if self.refine and not composer.refinable:
            raise LoramixError(f"composition '{self.compose}' cannot be refined (--refine)")
        if self.refine_budget is not None and not (math.isfinite(self.refine_budget) and self.refine_budget >= 0):
            raise LoramixError(f"--budget must be a non-negative number of seconds, got {self.refine_budget}")
        if not (isinstance(self.finetune, int) and not isinstance(self.finetune, bool) and self.finetune >= 0):
            raise LoramixError(f"--finetune takes a number of examples, got {self.finetune}")
        if self.finetune and self.refine_budget == 0:
            raise LoramixError("--finetune needs a positive --budget (or none: the bank's 150 training steps)")

    def signature_spec(self) -> SignatureSpec:
        return SignatureSpec(self.signature, self.model, self.max_samples, self.seed)


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise LoramixError(f"{name} must be at least {low}, got {value}")


def method_fields() -> list:
    """The fields that `generate` and `bank loo` share, in declaration order."""
    return [f for f in fields(GenerateConfig) if f.metadata["method"]]
