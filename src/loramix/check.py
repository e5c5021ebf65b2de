"""The held-out check: the user's own labels choose among candidate compositions. A held-out slice of the dataset
scores the base model, the composed update at a few scales and the top entries alone (teacher-forced loss and token
accuracy, and for the default criterion the ROUGE-L of greedy answers); the one a criterion prefers is kept, and the
report says when none beat the base. On PyTorch the bank's factors are mixed exactly by forward hooks; on llama.cpp
the candidates are written as GGUF LoRAs (runtime.candidates)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Annotated, Any, Sequence

import torch

from .arguments import Range, checked
from .bank import Bank
from .data import Dataset
from .errors import LoramixError, setting
from .progress import track
from .runtime.memory import available_bytes
from .report import CheckInfo, CheckPlan
from .runtime import Speed
from .runtime.lora import MixedLoRA
from .runtime.pytorch import answer_scores_fn, frozen_base, speed
from .runtime.scores import CRITERIA, AnswerScores

log = logging.getLogger("loramix")

CHECK_SCALES = (0.5, 1.0, 1.5, 2.0)  # of the composed update; the base model is always a candidate


def scale_label(s: float) -> str:
    """The check's label of the composition scaled by s: 'x<s>'."""
    return f"x{s:g}"


@checked
def check_candidates(coefficients: dict[str, float], scales: Sequence[float] = CHECK_SCALES,
                     singles: Annotated[int, Range(0, None)] = 0,
                     tops: Annotated[int, Range(0, None)] = 0) -> dict[str, dict[str, float]]:
    """The compositions `check` compares, label -> coefficients (every name of `coefficients`), in order of preference
    on ties: 'base' (all 0), 'x<s>' the composition scaled by s for each non-zero scale (ascending), 'top<k>' for
    k = 2..`tops` the composition restricted to its k largest coefficients and rescaled to its total weight, and
    'entry:<name>' each of the `singles` largest coefficients' entries alone at weight 1."""
    if any(s < 0 for s in scales):
        raise LoramixError(f"check_candidates(): scales must be positive (the base, scale 0, is always a candidate), "
                           f"got {list(scales)}")
    zero = dict.fromkeys(coefficients, 0.0)
    out = {"base": zero}
    for s in sorted(x for x in scales if x != 0):
        out[scale_label(s)] = {n: s * c for n, c in coefficients.items()}
    ranked = [n for n in sorted(coefficients, key=lambda n: -coefficients[n]) if coefficients[n] > 0]
    total = sum(coefficients[n] for n in ranked)
    for k in range(2, min(tops, len(ranked) - 1) + 1):  # keeping every non-zero entry would repeat 'x1'
        kept = sum(coefficients[n] for n in ranked[:k])
        out[f"top{k}"] = {**zero, **{n: coefficients[n] * total / kept for n in ranked[:k]}}
    for name in ranked[:singles]:
        out[f"entry:{name}"] = {**zero, name: 1.0}
    return out


def scaled_layers(label: str, layers: dict[int, dict[str, float]] | None,
                  scales: Sequence[float] = CHECK_SCALES) -> dict[int, dict[str, float]] | None:
    """The per-layer weights (layer -> entry -> weight) of check candidate `label` for a per-layer composition
    `layers`: every layer scaled for a scaled candidate ('x<s>'); None for the others or without `layers`."""
    scaled = {scale_label(s): s for s in scales if s != 0}
    if layers is None or label not in scaled:
        return None
    return {layer: {n: scaled[label] * w for n, w in row.items()} for layer, row in layers.items()}


@checked
def check(bank: Bank, coefficients: dict[str, float], dataset: Dataset, *, examples: Annotated[int, Range(1, None)] = 16, method: str = "exact",
          scales: Sequence[float] = CHECK_SCALES, singles: int = 0, tops: int = 0, criterion: str = "loss", seed: int = 0,
          layers: dict[int, dict[str, float]] | None = None, model: Any = None, tokenizer: Any = None,
          engine: Any = None, rank: Any = None) -> CheckInfo:
    """Score every `check_candidates` composition of `coefficients` (the base model included) on `examples` samples of
    `dataset` (seeded) by teacher-forced answer scores; keep the best by `criterion` (CRITERIA; ties go to the
    earlier candidate: the base, then smaller scales). With `layers` (a per-layer composition, `coefficients` being
    its mean over layers), the scaled candidates scale every layer's weights; the others are as without. On PyTorch
    (`model`, loaded unless given) the bank's factors are mixed exactly; with `engine` (a runtime.llamacpp.LlamaCpp)
    the candidates are compositions at output rank `rank`, written as GGUF LoRAs (runtime.candidates)."""
    if criterion not in CRITERIA:
        raise LoramixError(f"unknown check criterion '{criterion}' (choose from {', '.join(CRITERIA.names())})")
    candidates = check_candidates(coefficients, scales, singles, tops)
    samples = dataset.subsample(examples, seed).samples
    scaled = {scale_label(s): s for s in scales if s != 0}
    if engine is not None:
        from .runtime.candidates import candidate_loras

        scores = {}
        with candidate_loras(bank, coefficients, candidates, scaled, engine, method=method, rank=rank,
                             layers=layers) as loras:
            for label in track(candidates, f"checking ({len(samples)} held-out examples, llama.cpp)", total=len(candidates)):
                scores[label] = engine.scores(samples, lora=loras[label], generate=CRITERIA.get(criterion).generates)
        return _chosen(len(samples), criterion, scores, candidates, layers, scales, "llama.cpp")
    model, tokenizer = frozen_base(bank.base_model, model, tokenizer)
    names = [n for n in coefficients if any(c[n] != 0 for c in candidates.values())]
    if mix_bytes(bank, names) > available_bytes() // 2:  # the exact mix would not fit beside the base: files instead
        return _check_composed(bank, coefficients, candidates, scaled, samples, criterion, layers, scales, model,
                               tokenizer, method, rank)
    mixed = MixedLoRA(model, bank, [bank.entry(n) for n in names], method)
    per_layer = None
    if layers is not None:
        per_layer = torch.tensor([[layers.get(layer, {}).get(n, 0.0) for n in names] for layer in mixed.layers],
                                 dtype=torch.float32)  # [layers, k]

    def weights(label: str) -> torch.Tensor:
        if per_layer is not None and label in scaled:
            return scaled[label] * per_layer
        return torch.tensor([candidates[label][n] for n in names], dtype=torch.float32)

    scores = {}
    try:
        fn = answer_scores_fn(model, tokenizer, samples, generate=CRITERIA.get(criterion).generates)
        for label in track(candidates, f"checking ({len(samples)} held-out examples)", total=len(candidates)):
            mixed.weights = weights(label)
            scores[label] = fn()
    finally:
        mixed.remove()
    return _chosen(len(samples), criterion, scores, candidates, layers, scales)


def mix_bytes(bank: Bank, names: Sequence[str]) -> int:
    """Bytes MixedLoRA takes to mix the entries `names` exactly: their factors stacked in float32."""
    return 4 * sum(m.rank * (m.in_features + m.out_features) for n in names for m in bank.entry(n).adapter.modules.values())


def _check_composed(bank: Bank, coefficients: dict[str, float], candidates: dict[str, dict[str, float]],
                    scaled: dict[str, float], samples: list, criterion: str, layers: Any, scales: Sequence[float],
                    model: Any, tokenizer: Any, method: str, rank: Any) -> CheckInfo:
    """The PyTorch check with each candidate an adapter file (runtime.candidates.composed_candidates, as llama.cpp
    scores them: the truncated composition at its scales, an entry alone, a top-k composition) in a temporary bank
    whose entries are mixed one at a time: for a bank whose factors mixed exactly would not fit in memory."""
    import tempfile
    from pathlib import Path

    from .runtime.candidates import composed_candidates

    log.warning("held-out check: the bank's %d entries mixed exactly would not fit in memory beside the base; the "
                "candidates are scored as the adapters they would be written as", len(coefficients))
    with tempfile.TemporaryDirectory(prefix="loramix-check-") as tmp:
        made = composed_candidates(bank, coefficients, candidates, scaled, Path(tmp) / "composed", method=method,
                                   rank=rank, layers=layers)
        links = Path(tmp) / "bank"
        links.mkdir()
        folders = sorted({folder for folder, _ in made.values()})
        for i, folder in enumerate(folders):
            (links / f"c{i}").symlink_to(folder.resolve(), target_is_directory=True)
        files = Bank(links, allow_pickle=bank.allow_pickle)
        fn = answer_scores_fn(model, tokenizer, samples, generate=CRITERIA.get(criterion).generates)
        scores = {}
        for label in track(candidates, f"checking ({len(samples)} held-out examples)", total=len(candidates)):
            if label not in made:  # the base
                scores[label] = fn()
                continue
            folder, scale = made[label]
            mixed = MixedLoRA(model, files, [files.entry(f"c{folders.index(folder)}")], "exact")
            try:
                mixed.weights = torch.tensor([scale], dtype=torch.float32)
                scores[label] = fn()
            finally:
                mixed.remove()
    return _chosen(len(samples), criterion, scores, candidates, layers, scales)


def _chosen(examples: int, criterion: str, scores: dict[str, AnswerScores], candidates: dict[str, dict[str, float]],
            layers: dict[int, dict[str, float]] | None, scales: Sequence[float], runtime: str = "torch") -> CheckInfo:
    """The CheckInfo of `scores`: the candidate `criterion` ranks first (the earliest on ties)."""
    chosen = CRITERIA.get(criterion).choose(scores, examples)
    measured = {k: {m: x for m, x in asdict(v).items() if x is not None} for k, v in scores.items()}
    return CheckInfo(examples, criterion, measured, chosen, chosen != "base", runtime, candidates[chosen],
                     scaled_layers(chosen, layers, scales))


# --check auto: the forms tried in order until one's estimated time fits the budget (criterion None: as configured)
FALLBACK_CRITERION = "accuracy"  # forward passes only: token accuracy, then loss
MIN_EXAMPLES = 4


def plan_check(held: Dataset, tokenizer: Any, speed: Speed, *, examples: int, criterion: str, singles: int,
               tops: int, scales: Sequence[float], budget: float, seed: int = 0) -> CheckPlan:
    """The first form of the check on `held` (the held-out examples, drawn as `check` draws them: subsample(n, seed))
    whose estimated time (Speed.seconds x the candidates) fits `budget` seconds: the configured one; then the
    forward-only criterion (FALLBACK_CRITERION, where the configured one generates: greedy answers on a few examples are
    the evidence least to trust) on as many examples as possible (halved down to MIN_EXAMPLES), and for each count
    the candidates from the most to the fewest: with the single entries, without them, then the base against the
    composition alone (scale 1). None fits: skipped. The full form's `why` holds no figure (loramix.json stays the same
    from run to run)."""
    counts = [examples]
    while counts[-1] // 2 >= MIN_EXAMPLES:
        counts.append(counts[-1] // 2)
    cheaper = FALLBACK_CRITERION if CRITERIA.get(criterion).generates else criterion
    pools = list(dict.fromkeys([(singles, tuple(scales)), (0, tuple(scales)), (0, (1.0,))]))
    forms = [(criterion, examples, *pools[0])]
    forms += [(cheaper, n, *pool) for n in counts for pool in pools if (cheaper, n, *pool) != forms[0]]
    tried = []
    for crit, n, single, pool in forms:
        candidates = 1 + len([s for s in pool if s != 0]) + max(0, tops - 1) + single
        estimate = candidates * speed.seconds(held.subsample(n, seed).samples, tokenizer, CRITERIA.get(crit).generates)
        tried.append(estimate)
        if estimate > budget:
            continue
        if len(tried) == 1:
            return CheckPlan(n, crit, single, list(pool), "full", f"its estimated time fits {setting('check_budget', format(budget, 'g'))} s")
        what = "the base against the composition" if pool == (1.0,) else (
            f"{candidates} candidates" + ("" if single else " (no single entries)"))
        return CheckPlan(n, crit, single, list(pool), "reduced",
                         f"the full check was estimated at {tried[0]:.0f} s, over {setting('check_budget', format(budget, 'g'))} s: ran {what} "
                         f"on {n} examples by {crit} (estimated {estimate:.0f} s)", round(estimate, 1))
    return CheckPlan(0, criterion, singles, list(scales), "skipped",
                     f"even its cheapest form was estimated at {min(tried):.0f} s, over {setting('check_budget', format(budget, 'g'))} s "
                     f"(prompt {speed.tokens_per_second:.1f} tokens/s, {speed.seconds_per_step:.2f} s a decoding step)",
                     round(min(tried), 1))


def check_plan(config: Any, held: Dataset, model: Any, tokenizer: Any, engine: Any, examples: int) -> CheckPlan:
    """The check `config` (a GenerateConfig) asks for on `held`: `check` N as asked; 'auto' planned from the runtime's
    speed, measured on one held-out example, to fit `check_budget` (plan_check); at most `examples` examples."""
    if not config.check_auto:
        return CheckPlan(examples, config.check_criterion, config.check_singles, list(CHECK_SCALES), "as asked")
    sample = held.subsample(1, config.seed + 1).samples[0]
    measured = engine.speed(sample) if engine is not None else speed(model, tokenizer, sample)
    plan = plan_check(held, engine.tokenizer if engine is not None else tokenizer, measured, examples=examples,
                      criterion=config.check_criterion, singles=config.check_singles, tops=config.check_tops,
                      scales=CHECK_SCALES, budget=config.check_budget, seed=config.seed + 1)
    if plan.mode != "full":
        log.warning("held-out check %s: %s", plan.mode, plan.why)
    return plan
