"""`generate`'s configuration: the single source of truth for its choices. Fields are grouped by the stage they
configure (STAGES, in the order the data flows) and each carries its help text and CLI flag (the CLI's options, in one
panel per stage, are generated from it); each stage's fields are validated in `__post_init__` against the
registries, so an invalid choice is refused when the configuration is made, before any work is done."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, fields
from functools import cache
from typing import Any, get_type_hints

from .adapter import DTYPES
from .arguments import check_seed
from .bank import not_utf8, unreadable
from .checks import fits
from .compose import COMPOSERS
from .distances import DISTANCES, get_distance
from .errors import LoramixError, setting
from .operators import OPERATORS
from .registry import options
from .refine import REFINE_METHODS
from .runtime.scores import CRITERIA
from .probes import ProbeSet
from .runtime import RUNTIMES
from .signatures import SIGNATURES, SignatureSpec
from .signing import signing_names
from .train_config import REFINE_TRAINING

log = logging.getLogger("loramix")
DTYPE_NAMES = tuple(DTYPES)  # the output dtypes generate writes
CHECK_EXAMPLES = 16  # --check's default without --refine
AUTO_REFINE = 16  # the examples --refine auto trains on
AUTO_REFINE_SECONDS = 60.0  # what --refine auto may be estimated to take on this CPU (else the check runs instead)
# The stages a GenerateConfig field configures, in the order the data flows (each field's metadata["stage"]).
STAGES = ("signature", "distance", "coefficients", "composition", "base model", "check", "refine")


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


def _declared(registry) -> str:
    """What each variant of `registry` declares, e.g. 'neural: epochs (40), lr (0.001); neural-answer: ...'."""
    return "; ".join(f"{n}: " + ", ".join(f"{k} ({p.default:g})" for k, p in registry.get(n).parameters.items())
                     for n in registry.names() if registry.get(n).parameters)


def option(default, help: str, *, stage: str, flag: str | None = None, method: bool = True):
    """A configuration field: its default, help text, the stage it configures (STAGES), CLI flag (default --<name>)
    and whether it is one of the method options that `generate` and `bank loo` share (`method`)."""
    assert stage in STAGES, stage
    return field(default=default, metadata={"help": help, "stage": stage, "flag": flag, "method": method})


def flag(name: str) -> str:
    """The CLI flag of the GenerateConfig field `name` (--<name with dashes> unless it declares another)."""
    f = GenerateConfig.__dataclass_fields__.get(name)
    return (f.metadata["flag"] if f is not None else None) or "--" + name.replace("_", "-")


@dataclass
class GenerateConfig:
    """Every choice `generate` makes (see each field's help). Validated on creation; `dataclasses.replace`
    re-validates."""

    signature: str = option(SignatureSpec.method, f"Dataset signature: {_names(SIGNATURES)}.", stage="signature")
    distance: str = option("gaussian-w2", f"Distance between signatures: {_distance_help()}.", stage="distance")
    operator: str = option("normalized", f"Meta-operator: {_names(OPERATORS)}.", stage="coefficients")
    compose: str = option("exact", f"Composition: {_names(COMPOSERS)} (exact: the sum of updates; paper: A and B "
                          "averaged).", stage="composition")
    rank: int | str | None = option(None, "Output rank: an integer, or 'full'. Default: the bank's largest rank.", stage="composition")
    top_k: int | None = option(None, "Keep only the k largest coefficients.", stage="coefficients")
    temperature: float = option(1.0, "Softmin temperature (larger: flatter weights).", stage="coefficients")
    seed: int = option(0, "Seed for subsampling, sliced projections and MMD draws.", stage="signature")
    max_samples: int | None = option(SignatureSpec.max_samples, "At most this many samples per dataset for signatures.", stage="signature")
    model: str | None = option(None, "Embedding model (embed) or base model (unigram, hidden) override.", stage="signature")
    entry_signatures: str = option("auto", "How bank entries are signed: 'data' (their train.jsonl; entries without it "
                                   "get no weight), 'probes' (every entry by its greedy answers to probe prompts, "
                                   "--probes: no bank data used), 'auto' (train.jsonl where an entry has one, its probe "
                                   "answers elsewhere, their distances aligned onto the data distances' scale; 'data' "
                                   "when every entry has data). Probe answers run the base model once per bank and "
                                   "are cached.", stage="signature")
    probes: str | None = option(None, "The probe prompts entries without data answer: a dataset file, its inputs. "
                                "Default: the 48 everyday prompts shipped with loramix.", stage="signature")
    operator_options: dict[str, float] | None = option(None, "The trained operator's own parameters, NAME=VALUE "
                                                       "(repeatable): " + _declared(OPERATORS) + ".",
                                                       flag="--operator-option", stage="coefficients")
    scale: float = option(1.0, "Global scale of the composed update: the coefficients sum to it.", stage="coefficients")
    calibration: bool = option(False, "Use the bank's calibration (`loramix bank calibrate`) when it has one for this "
                               "setting: its temperature, top-k and scale replace those options. Off by default: "
                               "on the 53 leave-one-out tasks it lowered ROUGE-L (docs/benchmarks.md, bench-quality).", stage="coefficients")
    dtype: str | None = option(None, f"Output dtype: {', '.join(DTYPE_NAMES)} (default: the bank's).", method=False, stage="composition")
    check: int | str | None = option("auto", "Hold out this many examples of DATA and keep, of the base model, the composed "
                                     "update at scales 0.5 to 2, its top entries (--check-tops) and the top entries "
                                     "alone (--check-singles), the one the held-out examples prefer (--check-criterion). "
                                     "Runs the base model: forward passes, and greedy answers for --check-criterion "
                                     "rouge. 0: no check (the composition as the operator gives it, without loading the "
                                     f"base). 'auto' (default): {CHECK_EXAMPLES} examples, or 0 when --refine runs (refinement "
                                     "trains on the examples a check would hold out), when the check's time, estimated "
                                     "from the base's measured speed, fits --check-budget; else a cheaper form that fits "
                                     "(forward-only, fewer examples, no single entries) or none; loramix.json says "
                                     "which and why.", method=False, stage="check")
    check_budget: float = option(120.0, "Seconds the held-out check's forward passes and answers may take with --check "
                                 "auto (estimated before it runs, from the base's measured speed; composing its "
                                 "candidates comes on top: about 35 s for 500 entries of a 7B model).", method=False, stage="check")
    base: str | None = option(None, "Base model the check (and --refine) run: default the bank's. A GGUF file (a path, "
                              "or owner/repo/file.gguf from the hub) runs on llama.cpp.", method=False, stage="base model")
    runtime: str = option("auto", "What runs the base model for the check: auto (llama.cpp for a GGUF base, else "
                          "PyTorch), torch, llama.cpp (a GGUF base; the default base's shipped GGUF). --refine "
                          "always trains on PyTorch.", method=False, stage="base model")
    check_singles: int = option(4, "With --check: also try each of the top this-many entries alone.", method=False, stage="check")
    check_tops: int = option(0, "With --check: also try the composition kept to its top 2, ..., this-many entries "
                             "(rescaled to its total weight).", method=False, stage="check")
    check_criterion: str = option("rouge", "With --check: rank candidates by 'loss' (answer loss), 'accuracy' "
                                  "(teacher-forced token accuracy, then loss), 'exact' (examples whose whole answer "
                                  "is the most likely continuation, then accuracy, then loss) or 'rouge' (ROUGE-L of "
                                  "each candidate's greedy answers, then accuracy, then loss; about twice the CPU).",
                                  method=False, stage="check")
    refine: int | str | None = option("auto", "Refine the adapter on this many examples of DATA, as --refine-method "
                                      "says (runs the base model on PyTorch). 'auto' (default): "
                                      f"{AUTO_REFINE} examples when --check is left to auto, the base runs on PyTorch "
                                      "and the refinement is estimated (on this CPU, before it starts) to take at most "
                                      f"{AUTO_REFINE_SECONDS:g} s; else none, and the check runs instead (loramix.json "
                                      "says which and why). 0: the gradient-free composition (with --check 0: the "
                                      "paper's method exactly).", method=False, stage="refine")
    refine_method: str = option("finetune", "How --refine uses its examples: finetune (train the composed adapter's own "
                                "LoRA factors, from the composition, with `loramix train`'s optimizer; from scratch when a "
                                "check kept the base), or a search of the top entries' weights: gradient (by "
                                f"backpropagation), nevergrad. Registered: {_names(REFINE_METHODS)}.", method=False, stage="refine")
    refine_steps: int | None = option(None, "Optimizer steps (--refine-method finetune: batches of 8) or loss "
                                      "evaluations (weight searches) of --refine. Default: finetune "
                                      f"{REFINE_TRAINING.steps}, the searches 40.", method=False, stage="refine")
    refine_budget: float | None = option(None, "Seconds --refine may take at most (no step starts that would end past "
                                         "them); default: no limit but --refine-steps (a --refine estimated past 600 s is refused before it starts).",
                                         flag="--budget", method=False, stage="refine")
    refine_max_tokens: int = option(REFINE_TRAINING.max_tokens, "Token positions --refine-method finetune may run at "
                                    "most: its steps cut to the first whose tokens fit (the shared prompt prefix "
                                    "counted once; deterministic, unlike --budget; a CPU thread runs about 210 a "
                                    "second); 0: no limit.", method=False, stage="refine")
    refine_options: dict[str, float] | None = option(None, "The refine method's own parameters, NAME=VALUE "
                                                     "(repeatable): " + _declared(REFINE_METHODS) + ".",
                                                     flag="--refine-option", method=False, stage="refine")
    refine_per_layer: bool = option(True, "With a weight search (--refine-method gradient, nevergrad): one weight per "
                                    "entry and layer (the layers composed apart); --no-refine-per-layer: one weight "
                                    "per entry.", method=False, stage="refine")

    def __post_init__(self) -> None:
        hints = _field_types()
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name], f.type)
        for name in ("model", "probes", "base"):  # "" would be read as the current folder
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise LoramixError(f"{setting(name)} must name a model or file, got an empty string (None: the default)")
            if getattr(self, name) is not None and (why := not_utf8(getattr(self, name))) is not None:
                raise LoramixError(f"{setting(name)} {getattr(self, name)}: {unreadable(getattr(self, name), why, 'rename it')}")
        self._check_signature()
        get_distance(self.distance, SIGNATURES.get(self.signature).kind)
        self._check_coefficients()
        self._check_composition()
        if self.runtime not in RUNTIMES:
            raise LoramixError(f"{setting('runtime')} must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        self._check_check()
        self._check_refine()

    def _check_signature(self) -> None:
        SIGNATURES.get(self.signature)
        check_seed("", self.seed)
        _at_least("max_samples", self.max_samples, 1)
        if self.entry_signatures not in signing_names():
            raise LoramixError(f"{setting('entry_signatures')} must be one of {', '.join(signing_names())}, got "
                               f"{self.entry_signatures!r}")

    def _check_coefficients(self) -> None:
        options("operator", self.operator, OPERATORS.get(self.operator).parameters, self.operator_options)
        _at_least("top_k", self.top_k, 1)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise LoramixError(f"{setting('temperature')} must be positive and finite, got {self.temperature}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise LoramixError(f"{setting('scale')} must be positive and finite, got {self.scale}")

    def _check_composition(self) -> None:
        composer = COMPOSERS.get(self.compose)
        if isinstance(self.rank, str) and self.rank != "full":
            try:
                self.rank = int(self.rank)
            except ValueError:
                raise LoramixError(f"{setting('rank')} must be an integer or 'full', got {self.rank!r}") from None
        composer.validate(self.rank)
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise LoramixError(f"{setting('dtype')} must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")

    def _check_check(self) -> None:
        self.check = _count_or_auto("check", self.check)
        if not (math.isfinite(self.check_budget) and self.check_budget > 0):
            raise LoramixError(f"{setting('check_budget')} must be a positive number of seconds, got {self.check_budget}")
        _at_least("check_singles", self.check_singles, 0)
        _at_least("check_tops", self.check_tops, 0)
        if self.check_criterion not in CRITERIA:
            raise LoramixError(f"{setting('check_criterion')} must be one of {', '.join(CRITERIA.names())}, got "
                               f"{self.check_criterion!r}")

    def _check_refine(self) -> None:
        self.refine = _count_or_auto("refine", self.refine)
        method = REFINE_METHODS.get(self.refine_method)
        if self.refine_examples and method.searches and not COMPOSERS.get(self.compose).refinable:
            raise LoramixError(f"composition '{self.compose}' cannot be refined by a weight search ({setting('refine_method')} "
                               f"{self.refine_method}); a refine method that trains the adapter (finetune) can")
        given = method.options(self.refine_options)
        if given.get("lower", -math.inf) >= given.get("upper", math.inf):
            raise LoramixError(f"{setting('refine_options')}: lower must be below upper, got {given['lower']} and {given['upper']}")
        _at_least("refine_steps", self.refine_steps, 1)
        _at_least("refine_max_tokens", self.refine_max_tokens, 0)
        if self.refine_budget is not None and not (math.isfinite(self.refine_budget) and self.refine_budget > 0):
            raise LoramixError(f"{setting('refine_budget')} must be a positive number of seconds, got {self.refine_budget}")

    @property
    def check_auto(self) -> bool:
        """Whether the check is planned to fit --check-budget (--check auto, the default)."""
        return self.check in (None, "auto")

    @property
    def check_examples(self) -> int:
        """The examples the held-out check uses at most: `check` N, else its default (0 when refinement is asked
        for: `refine_examples`; `generate` runs it after all when 'auto' refinement does not fit)."""
        return self.check if not self.check_auto else 0 if self.refine_examples else CHECK_EXAMPLES

    @property
    def refine_auto(self) -> bool:
        """Whether refinement is decided when the base is loaded (`refine` auto, the default)."""
        return self.refine in (None, "auto")

    @property
    def refine_examples(self) -> int:
        """The examples refinement asks for: `refine` N, else AUTO_REFINE when the check is left to 'auto' (0 when
        the user chose a check: `check` 0 is the gradient-free composition)."""
        return self.refine if not self.refine_auto else AUTO_REFINE if self.check_auto else 0

    def check_bank(self, index: Any, spec: SignatureSpec) -> None:
        """Refuse what the bank of `index` (a BankIndex) cannot do with this configuration (`spec`: its signature,
        resolved), before any signature is computed."""
        bank, mode = index.bank, index.mode(self.entry_signatures)
        if not mode.weighted(bank):
            raise LoramixError(f"{bank.path}: no bank entry has training data (train.jsonl), so none can be weighted "
                               f"with {setting('entry_signatures', self.entry_signatures)} ('auto' signs them by their "
                               "answers to probe prompts)")
        if self.probes is not None and not mode.probes:
            log.warning("the probe file %s is not used: every entry is signed by its training data (entry signatures "
                        "%s)", self.probes, self.entry_signatures)
        if mode.probes and bank.base_model is None:
            raise LoramixError(f"{bank.path}: {setting('entry_signatures', self.entry_signatures)} signs entries by their "
                               "answers to probe prompts, which needs the base model, and the bank names none")
        if SIGNATURES.get(spec.method).needs_base and spec.model is None:
            raise LoramixError(f"signature '{spec.method}' needs the base model: the bank names none, pass {setting('model')}")
        operator = OPERATORS.get(self.operator)
        if operator.trainable and len(bank.usable) < operator.min_entries:
            raise LoramixError(f"operator '{self.operator}' needs at least {operator.min_entries} bank entries with data to fit")
        COMPOSERS.get(self.compose)().check(bank.entries)

    def signature_spec(self) -> SignatureSpec:
        return SignatureSpec(self.signature, self.model, self.max_samples, self.seed)

    def probe_set(self) -> ProbeSet:
        return ProbeSet(self.probes, self.max_samples, self.seed)


@cache
def _field_types() -> dict[str, Any]:
    return get_type_hints(GenerateConfig)


def _check_type(name: str, value: object, hint: Any, annotation: str) -> None:
    """Refuse a value of another type than the field's annotation (`hint`, written `annotation`, e.g. 'int | None')
    allows; a float must be finite."""
    if fits(value, hint):
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not fits(value, float) and fits(0.0, hint):
        raise LoramixError(f"{setting(name)} must be finite, got {value}")
    raise LoramixError(f"{setting(name)} must be {annotation.replace('|', 'or')}, got "
                       f"{type(value).__name__} {value!r}")


def _count_or_auto(name: str, value: int | str | None) -> int | str | None:
    """A count of examples (at least 0; text that is one, from the CLI, parsed) or 'auto' / None (decided later)."""
    if value is None or value == "auto":
        return value
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise LoramixError(f"{setting(name)} must be an integer or 'auto', got {value!r}") from None
    _at_least(name, value, 0)
    return value


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise LoramixError(f"{setting(name)} must be at least {low}, got {value}")


def method_fields() -> list:
    """The fields that `generate` and `bank loo` share, in declaration order."""
    return [f for f in fields(GenerateConfig) if f.metadata["method"]]
