"""Training settings, apart from the trainer (train.py) so that the command line and readers can use them
without importing the training stack."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .adapter import DTYPES
from .arguments import check_fields, check_seed, finite
from .errors import LoramixError, setting


@dataclass
class TrainConfig:
    """LoRA fine-tuning settings: `steps` optimizer steps of `batch_size` samples drawn (seeded) from the
    data; AdamW at `lr` with `warmup` linear steps, then cosine decay; LoRA of `rank` / `alpha` on
    `target_modules`; sequences cut to `max_length` tokens; `bf16`: bf16 autocast where the device runs it natively
    (runtime.bf16_native; float32 elsewhere); saved as `save_dtype`. With `budget` (seconds), training
    stops by then: after the warmup the step time is measured and the cosine schedule shortened to the steps that
    fit, so the learning rate still decays to 0. With `max_tokens`, the same deterministically: the seeded batches
    are planned up front and training takes the first ones whose token positions (`SharedBatch.tokens`, the shared
    prefix counted once) sum to at most `max_tokens` (at least one step), the schedule ending there."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-3
    warmup: int = 10
    rank: int = 8
    alpha: float = 16  # a whole number as PEFT's configs have it, or any positive finite one
    dropout: float = 0.0
    target_modules: list[str] | tuple[str, ...] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    max_length: int = 256
    seed: int = 0
    bf16: bool = True
    save_dtype: str = "float32"
    device: str | None = None  # None: cuda when available, else cpu
    budget: float | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        """Refuse settings no run can use, naming `loramix train`'s option; then any field whose type its annotation
        does not allow (a string for `bf16` or `seed`, ...)."""
        def whole(x: object, low: int) -> bool:
            return isinstance(x, int) and not isinstance(x, bool) and x >= low

        def positive(x: object, allow_zero: bool = False) -> bool:
            return (isinstance(x, (int, float)) and not isinstance(x, bool) and finite(x)
                    and (x > 0 or (allow_zero and x == 0)))

        checks = [
            ("steps", self.steps, whole(self.steps, 1), "a whole number of at least 1"),
            ("batch_size", self.batch_size, whole(self.batch_size, 1), "a whole number of at least 1"),
            ("lr", self.lr, positive(self.lr, allow_zero=True), "a finite number of at least 0"),
            ("warmup", self.warmup, whole(self.warmup, 0), "a whole number of at least 0"),
            ("rank", self.rank, whole(self.rank, 1), "a whole number of at least 1"),
            ("alpha", self.alpha, positive(self.alpha), "a positive finite number"),
            ("dropout", self.dropout, isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "in [0, 1)"),
            ("target_modules", self.target_modules, bool(self.target_modules) and all(
                isinstance(m, str) and m for m in self.target_modules), "one module name or more"),
            ("max_length", self.max_length, whole(self.max_length, 2), "a whole number of at least 2"),
            ("save_dtype", self.save_dtype, isinstance(self.save_dtype, str) and self.save_dtype in DTYPES, f"one of {', '.join(DTYPES)}"),
            ("budget", self.budget, self.budget is None or positive(self.budget), "a positive number of seconds"),
            ("max_tokens", self.max_tokens, self.max_tokens is None or whole(self.max_tokens, 1),
             "a positive whole number of token positions"),
        ]
        for name, value, ok, want in checks:
            if not ok:
                raise LoramixError(f"{setting(name)} must be {want}, got {value!r}")
        check_fields(self)
        check_seed("TrainConfig: ", self.seed)
        if self.device is not None:
            _check_device(self.device)

    def as_record(self) -> dict:
        """The settings as training.json records them (`budget` and `max_tokens` only when set, so older records
        still match)."""
        d = asdict(self)
        for key in ("budget", "max_tokens"):
            if d[key] is None:
                del d[key]
        return d


def bank_config(*, steps: int = 150, rank: int = 6, save_dtype: str = "float16") -> TrainConfig:
    """The settings of a bank entry (`loramix bank build`): `steps` of the other defaults, LoRA `rank` with
    alpha = 2 * rank, weights saved as `save_dtype`."""
    return TrainConfig(steps=steps, rank=rank, alpha=2 * rank, save_dtype=save_dtype)


# The committed bank's training settings: q/k/v like Lots-of-LoRAs; rank 6 so that 53 fp16 adapters of
# SmolLM2-135M (0.97 MB each) fit the 60 MB the repository allows the bank.
BANK_TRAINING = bank_config()

# `generate --refine N`'s fine-tune of the composed adapter (--refine-method finetune): the bank's recipe for fewer
# steps, with a warmup to match; chosen on the leave-one-out benchmark (docs/benchmarks.md, bench-quality: on all 53 tasks 16 steps
# closed 75.4% of the gap, 10 steps 73.8%, 24 steps 73.1%). At most 8000 token positions: a CPU thread runs about
# 210 a second, so that tasks with long examples (16 steps of news articles are 15,000 positions) stay within a
# minute; most tasks' 16 steps are 2,000-5,400.
REFINE_TRAINING = replace(BANK_TRAINING, steps=16, warmup=2, max_tokens=8000)


def _check_device(name: str) -> None:
    """Refuse a device this machine cannot train on: not a torch device, a kind without weights (meta), or an
    accelerator that is absent (cuda:N beyond the GPUs present, mps off a Mac)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LoramixError(f"{setting('device')} must be a torch device such as cpu, cuda or cuda:0, got {name!r}") from None
    present = {"cpu": lambda: True,
               "cuda": lambda: torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
               "mps": lambda: torch.backends.mps.is_available()}
    if device.type not in present or not present[device.type]():
        raise LoramixError(f"{setting('device', repr(name))}: no such device on this machine (cpu, or a GPU it has)")

