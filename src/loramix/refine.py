"""Beyond the paper: refine the coefficients of the top entries on a few labelled examples, on CPU.

The base model runs with the k chosen bank LoRAs attached at once, each scaled by its weight w_i, so its update
is exactly the composition sum_i w_i s_i B_i A_i (or, for the LoraHub baseline, the A-and-B average). The loss
is the answer-token cross-entropy on the examples (+ an L1 penalty on w, as LoraHub); w is searched by
gradients with respect to the k weights only, or gradient-free with Nevergrad, warm-started from the
meta-operator's coefficients and stopped by a step count or a time budget."""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

from .bank import Bank, BankEntry
from .data import Dataset
from .arguments import check_fields
from .errors import LoramixError, setting
from .progress import track
from .runtime.lora import MixedLoRA, bank_layers
from .runtime.pytorch import answer_loss_fn
from .registry import Param, Registry, options
from .train_config import REFINE_TRAINING

log = logging.getLogger("loramix")


@dataclass
class FinetuneInfo:
    """The fine-tune of the composed adapter (`--refine N`, --refine-method finetune): examples, budget, whether it
    started from the composition (False: from scratch, a check having kept the base), optimizer steps, seconds, the
    training loss (answer cross-entropy, nats per token) of its first and last step, and the token limit
    (--refine-max-tokens; None: none, or a report older than it)."""

    examples: int
    budget_seconds: float | None
    from_composition: bool
    steps: int
    first_loss: float
    loss: float
    max_tokens: int | None = None
    seconds: float | None = None  # this run's wall seconds: not written to loramix.json (UNWRITTEN)


@dataclass
class RefineInfo:
    """A weight search (`--refine N --refine-method gradient|nevergrad`, `refine.refine`): its examples, method and
    budget, the meta-operator's coefficients it started from and the `coefficients` it found (per layer: their means
    over the layers), the loss (answer-token cross-entropy + l1, nats) before and after, the loss of every step, and
    per layer each layer's non-zero weights (layer index -> entry -> weight; `layer_weights` gives them all)."""

    examples: int
    method: str
    budget_seconds: float | None
    meta_coefficients: dict[str, float]
    initial_loss: float
    loss: float
    steps: int
    history: list[float]
    layers: dict[str, dict[str, float]] | None = None
    seconds: float | None = None  # this run's wall seconds: not written to loramix.json (UNWRITTEN)
    coefficients: dict[str, float] = field(default_factory=dict)

    def layer_weights(self) -> dict[int, dict[str, float]] | None:
        """layer -> every entry of `coefficients` -> its weight (0 where `layers` leaves it out); None without
        per-layer weights."""
        if self.layers is None:
            return None
        return {int(k): {n: row.get(n, 0.0) for n in self.coefficients} for k, row in self.layers.items()}


@dataclass
class RefineConfig:
    """`examples` labelled samples; the `top_k` largest coefficients searched (the rest stay 0); `method` a weight
    search of REFINE_METHODS ('gradient': Adam at `lr`; 'nevergrad': NGOpt); at most `steps` loss evaluations / steps and `budget`
    seconds (no step starts that would end past it, by the mean step time so far; the first always runs); `l1` *
    sum |w| added to the loss; weights kept in [`lower`, `upper`]; `per_layer`: one weight per entry and layer
    instead of per entry; `options`: the method's other declared parameters (RefineMethod.parameters)."""

    examples: int = 5
    top_k: int = 8
    method: str = "gradient"
    steps: int = 40
    budget: float | None = None
    lr: float = 0.05
    l1: float = 0.05
    lower: float = -1.5
    upper: float = 1.5
    per_layer: bool = False
    seed: int = 0
    options: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def of(cls, method: str, given: dict[str, Any] | None, **settings: Any) -> "RefineConfig":
        """The configuration of weight search `method` with `settings`, its declared parameters from `given` (each
        checked; the defaults otherwise): those a field holds set it, the others go to `options`."""
        declared = REFINE_METHODS.get(method).options(given)
        own = {f.name for f in fields(cls)}
        return cls(method=method, **settings, **{k: v for k, v in declared.items() if k in own},
                   options={k: v for k, v in declared.items() if k not in own})


class RefineMethod:
    """A way `--refine N` uses N of the user's examples, registered in REFINE_METHODS. A weight search (`searches`)
    runs before the check and gives the top entries new weights (`search`); a trainer runs once the composition is
    written and trains its factors (`train`). Each declares what the cost estimate of `refuse_slow_refine` needs:
    its default `steps`, whether a step runs a backward pass (`backward`: counted as three forward passes) and how
    many examples a step's forward pass takes (`batch`; None: all of them). `parameters`: its own knobs
    (GenerateConfig.refine_options sets them: `options` gives every one, given or default)."""

    name: ClassVar[str]
    searches: ClassVar[bool] = True
    steps: ClassVar[int] = 40
    backward: ClassVar[bool] = False
    batch: ClassVar[int | None] = None
    parameters: ClassVar[dict[str, Param]] = {}

    @classmethod
    def options(cls, given: dict[str, Any] | None) -> dict[str, float]:
        """Every declared parameter: `given` (checked) or its default."""
        return options("refine method", cls.name, cls.parameters, given)

    def search(self, mixed: MixedLoRA, objective: Callable[[torch.Tensor], torch.Tensor], w0: np.ndarray,
               cfg: "RefineConfig", deadline: float) -> tuple[np.ndarray, float, list[float]]:
        """A weight search: weights (w0's shape: [k], or [layers, k] per layer) minimising `objective` within
        `cfg.steps` evaluations and `deadline` (perf_counter seconds; `_overruns`), their objective, and the objective
        of every evaluation (history[0]: the start)."""
        raise NotImplementedError

    def train(self, folder: Path, bank: Bank, samples: Dataset, config: Any, *, from_composition: bool,
              model: Any = None, tokenizer: Any = None) -> FinetuneInfo:
        """A trainer: train the adapter written in `folder` on `samples` as `config` (a GenerateConfig) says."""
        raise NotImplementedError


REFINE_METHODS: Registry[type[RefineMethod]] = Registry("refine method")
# what every weight search declares: the L1 penalty of the objective and the bounds of the weights
_BOUNDED = {"l1": Param(RefineConfig.l1, "weight of the L1 penalty sum |w| added to the answer loss", low=0),
            "lower": Param(RefineConfig.lower, "the smallest weight"), "upper": Param(RefineConfig.upper, "the largest weight")}


@REFINE_METHODS.register("finetune")
class Finetune(RefineMethod):
    """Train the composed adapter's own LoRA factors with `loramix train`'s optimizer (REFINE_TRAINING), from the
    composition, or from a fresh LoRA when a check kept the base model (whose zero update's factors get no
    gradient)."""

    name = "finetune"
    searches = False
    steps = REFINE_TRAINING.steps
    backward = True
    batch = REFINE_TRAINING.batch_size
    parameters = {"lr": Param(REFINE_TRAINING.lr, "AdamW's peak learning rate", above=0),
                  "warmup": Param(REFINE_TRAINING.warmup, "linear warmup steps before the cosine decay", low=0, whole=True)}

    def train(self, folder, bank, samples, config, *, from_composition, model=None, tokenizer=None):
        """Train the adapter in `folder` on `samples` (its steps, budget and token limit as `config` says, seeded) and
        put the trained PEFT files in its place, in the dtype the composition was written in. `model`, `tokenizer`:
        the base, already loaded (the model gains the LoRA layers); loaded here when None."""
        import os
        import tempfile

        from safetensors import safe_open

        from .adapter import DTYPES
        from .files import CONFIG_FILE, WEIGHTS_FILE
        from .train import train
        with safe_open(folder / WEIGHTS_FILE, framework="pt") as f:
            dtype = f.get_tensor(next(iter(f.keys()))).dtype
        cfg = replace(REFINE_TRAINING, **self.options(config.refine_options), steps=config.refine_steps or self.steps,
                      budget=config.refine_budget, max_tokens=config.refine_max_tokens or None, seed=config.seed,
                      save_dtype=next((n for n, t in DTYPES.items() if t == dtype), "float32"))
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            record = train(samples, Path(tmp) / "tuned", cfg, base=bank.base_model, init=folder if from_composition else None,
                           model=model, tokenizer=tokenizer)
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                os.replace(Path(tmp) / "tuned" / name, folder / name)
        return FinetuneInfo(len(samples), config.refine_budget, from_composition, len(record["loss"]), record["loss"][0],
                            record["loss"][-1], cfg.max_tokens, seconds=record["seconds"])


def _rows(w: Any) -> int:
    """Layers a weight array spans: 1 for [k], L for [L, k] (the L1 penalty is averaged over them)."""
    return w.shape[0] if len(w.shape) == 2 else 1


def _overruns(step: int, began: float, deadline: float) -> bool:
    """Whether step number `step` (from 0), begun now, would end past `deadline` at the mean time of the steps since
    `began` (perf_counter seconds); the first step always runs."""
    now = time.perf_counter()
    return step > 0 and now + (now - began) / step > deadline


@REFINE_METHODS.register("gradient")
class GradientSearch(RefineMethod):
    """Adam on the weights (at `cfg.lr`, kept in [cfg.lower, cfg.upper]); returns the best weights seen."""

    name = "gradient"
    backward = True
    parameters = {"lr": Param(RefineConfig.lr, "Adam's learning rate on the weights", above=0), **_BOUNDED}

    def search(self, mixed, objective, w0, cfg, deadline):
        w = torch.tensor(w0, dtype=torch.float32, requires_grad=True)
        opt = torch.optim.Adam([w], lr=cfg.lr)
        best, best_w, history = float("inf"), w0.copy(), []
        began = time.perf_counter()
        for step in track(range(cfg.steps), "refining (gradient)", total=cfg.steps):
            if _overruns(step, began, deadline):
                break
            total = objective(w)
            history.append(total.item())
            if history[-1] < best:
                best, best_w = history[-1], w.detach().numpy().copy()
            opt.zero_grad()
            total.backward()
            opt.step()
            with torch.no_grad():
                w.clamp_(cfg.lower, cfg.upper)
        return best_w, best, history


@REFINE_METHODS.register("nevergrad")
class NevergradSearch(RefineMethod):
    """Nevergrad's NGOpt in [cfg.lower, cfg.upper], its first candidate the start; returns its recommendation."""

    name = "nevergrad"
    parameters = _BOUNDED

    def search(self, mixed, objective, w0, cfg, deadline):
        import nevergrad as ng

        start = np.clip(w0, cfg.lower, cfg.upper)
        param = ng.p.Array(init=start).set_bounds(cfg.lower, cfg.upper)
        param.random_state = np.random.RandomState(cfg.seed)
        opt = ng.optimizers.NGOpt(parametrization=param, budget=cfg.steps)
        opt.suggest(start)
        history = []
        began = time.perf_counter()
        with warnings.catch_warnings():
            # NGOpt may hand the search to scipy's COBYLA with tol=0, which scipy replaces by its default RHOEND with a
            # warning on every run: that one warning (and only it) is nevergrad's choice, not the user's concern
            warnings.filterwarnings("ignore", message=r".*Invalid RHOEND", category=UserWarning)
            for step in track(range(cfg.steps), "refining (nevergrad)", total=cfg.steps):
                if _overruns(step, began, deadline):
                    break
                cand = opt.ask()
                with torch.no_grad():
                    value = float(objective(torch.tensor(cand.value, dtype=torch.float32)))
                opt.tell(cand, value)
                history.append(value)
            w = np.asarray(opt.provide_recommendation().value)
        with torch.no_grad():
            return w, float(objective(torch.tensor(w, dtype=torch.float32))), history


def weight_search(name: str) -> RefineMethod:
    """The weight search `name` (a REFINE_METHODS entry that `searches`)."""
    method = REFINE_METHODS.get(name)
    if not method.searches:
        raise LoramixError(f"refine method '{name}' trains the adapter, it does not search weights: "
                           f"choose one of {', '.join(n for n in REFINE_METHODS.names() if REFINE_METHODS.get(n).searches)}")
    return method()


def search_weights(
    model: Any, tokenizer: Any, bank: Bank, entries: Sequence[BankEntry], w0: np.ndarray, samples: Sequence,
    cfg: RefineConfig, method: str = "exact",
) -> tuple[np.ndarray, float, float, list[float]]:
    """Search weights for `entries` (starting at w0 [k]) minimising loss + l1 |w| (per layer, as the mean over layers,
    with `cfg.per_layer`: then w0 is repeated for every layer and the weights returned are [layers, k]). Returns
    (weights, the start's objective (history[0]), the returned weights' objective, history); the best point of a
    gradient search is one it has evaluated, so no extra forward pass is spent. The base model's own weights never
    change."""
    for p in model.parameters():
        p.requires_grad_(False)
    deadline = time.perf_counter() + (cfg.budget if cfg.budget is not None else float("inf"))
    mixed = MixedLoRA(model, bank, entries, method)
    if cfg.per_layer:
        w0 = np.tile(w0, (len(mixed.layers), 1))
    loss_fn = answer_loss_fn(model, tokenizer, samples)

    def objective(w: torch.Tensor) -> torch.Tensor:
        mixed.weights = w
        return loss_fn() + cfg.l1 * w.abs().sum() / _rows(w)

    torch.manual_seed(cfg.seed)
    try:
        if cfg.steps < 1:
            with torch.no_grad():
                initial = float(objective(torch.tensor(w0, dtype=torch.float32)))
            return w0, initial, initial, []
        w, final, history = weight_search(cfg.method).search(mixed, objective, w0, cfg, deadline)
    finally:
        mixed.remove()
    return w, history[0], final, history


def refine(
    bank: Bank,
    coefficients: dict[str, float],
    dataset: Dataset,
    cfg: RefineConfig,
    *,
    method: str = "exact",
    model: Any = None,
    tokenizer: Any = None,
) -> RefineInfo:
    """Refine `coefficients` (from a meta-operator) on `cfg.examples` samples drawn from `dataset` (seeded): the
    top_k entries' weights are searched, the others set to 0; `method` is the composition method whose mix is
    searched (Composer.mix). Loads the bank's base model unless given."""
    from .runtime.pytorch import load_model, load_tokenizer

    if cfg.examples < 1:
        raise LoramixError(f"refinement needs at least 1 example, got {cfg.examples}")
    start = time.perf_counter()
    samples = dataset.subsample(cfg.examples, cfg.seed).samples
    ranked = sorted(coefficients, key=lambda n: -coefficients[n])[: cfg.top_k]
    entries = [bank.entry(n) for n in ranked]
    w0 = np.array([coefficients[n] for n in ranked], dtype=np.float64)
    if model is None:
        model, tokenizer = load_model(bank.base_model), load_tokenizer(bank.base_model)
    w, initial, final, history = search_weights(model, tokenizer, bank, entries, w0, samples, cfg, method)
    if final > initial:  # never worse than the start on the examples (per layer: the start repeated)
        w, final = (np.tile(w0, (np.shape(w)[0], 1)) if np.ndim(w) == 2 else w0), initial
    zero = dict.fromkeys(coefficients, 0.0)
    layers = None
    if cfg.per_layer and np.ndim(w) == 2:
        layers = {str(layer): {n: float(x) for n, x in zip(ranked, row) if x != 0} for layer, row in zip(bank_layers(bank), w)}
        w = np.mean(w, axis=0)
    refined = {**zero, **{n: float(x) for n, x in zip(ranked, np.ravel(w))}}
    return RefineInfo(len(samples), cfg.method, cfg.budget, coefficients, initial, final, len(history),
                      [round(h, 5) for h in history], layers, time.perf_counter() - start, refined)


REFINE_LIMIT = 600.0  # seconds --refine may be estimated to take without --budget (generate's own target)


def refine_estimate(config: Any, samples: Dataset, model: Any, tokenizer: Any) -> tuple[float, float, str]:
    """(seconds, seconds a step, what: in words) a refinement of `config` (a GenerateConfig) on `samples` is estimated
    to take on this CPU: one forward pass of a step's batch timed on the base (the method's `batch` first examples),
    a step with a backward pass counted as three, times the steps (a trainer's: those within refine_max_tokens)."""
    from .prompts import SharedBatch, encode, pad_id

    method = REFINE_METHODS.get(config.refine_method)
    items = encode(tokenizer, samples.samples, REFINE_TRAINING.max_length)
    batch = SharedBatch.of(items[: method.batch] if method.batch else items, pad_id(tokenizer))
    with torch.inference_mode():
        model(input_ids=batch.rest[:1, :4])  # first-call set-up, not counted
        start = time.perf_counter()
        batch.loss(model)
        forward = time.perf_counter() - start
    steps = config.refine_steps or method.steps
    if not method.searches and config.refine_max_tokens:
        steps = min(steps, max(1, config.refine_max_tokens // batch.tokens))
    step = forward * (3 if method.backward else 1)
    base = f"base model {config.base}" if config.base is not None else "the bank's base model"
    what = (f"{setting('refine', len(samples))} ({setting('refine_method', config.refine_method)}, {steps} steps of about "
            f"{step:.1f} s) on {base}: about {steps * step:.0f} s on this CPU")
    return steps * step, step, what


def refuse_slow_refine(config: Any, samples: Dataset, model: Any, tokenizer: Any) -> None:
    """Refuse, before it starts, the refinement of `config` (a GenerateConfig) on `samples` estimated
    (`refine_estimate`) to take more than REFINE_LIMIT seconds (without refine_budget) or whose one step exceeds
    refine_budget."""
    seconds, step, what = refine_estimate(config, samples, model, tokenizer)
    if config.refine_budget is None and seconds > REFINE_LIMIT:
        raise LoramixError(f"{what}: {setting('refine_budget', 'SECONDS')} caps it, {setting('refine', 0)} skips it")
    if config.refine_budget is not None and step > config.refine_budget:
        raise LoramixError(f"{what}: one step is more than {setting('refine_budget', format(config.refine_budget, 'g'))}")
    log.info("%s", what)

