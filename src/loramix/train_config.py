"""Training settings, apart from the trainer (train.py) so that the command line and readers can use them
without importing the training stack."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass
class TrainConfig:
    """LoRA fine-tuning settings: `steps` optimizer steps of `batch_size` samples drawn (seeded) from the
    data; AdamW at `lr` with `warmup` linear steps, then cosine decay; LoRA of `rank` / `alpha` on
    `target_modules`; sequences cut to `max_length` tokens; `bf16`: bf16 autocast where the device runs it natively
    (train.bf16_native; float32 elsewhere); saved as `save_dtype`. With `budget` (seconds), training
    stops by then: after the warmup the step time is measured and the cosine schedule shortened to the steps that
    fit, so the learning rate still decays to 0."""

    steps: int = 200
    batch_size: int = 8
    lr: float = 2e-3
    warmup: int = 10
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    max_length: int = 256
    seed: int = 0
    bf16: bool = True
    save_dtype: str = "float32"
    device: str | None = None  # None: cuda when available, else cpu
    budget: float | None = None

    def as_record(self) -> dict:
        """The settings as training.json records them (`budget` only when set, so older records still match)."""
        d = asdict(self)
        if d["budget"] is None:
            del d["budget"]
        return d


def bank_config(*, steps: int = 150, rank: int = 6, save_dtype: str = "float16") -> TrainConfig:
    """The settings of a bank entry (`loramix bank build`): `steps` of the other defaults, LoRA `rank` with
    alpha = 2 * rank, weights saved as `save_dtype`."""
    return TrainConfig(steps=steps, rank=rank, alpha=2 * rank, save_dtype=save_dtype)


# The committed bank's training settings: q/k/v like Lots-of-LoRAs; rank 6 so that 53 fp16 adapters of
# SmolLM2-135M (0.97 MB each) fit the 60 MB the repository allows the bank.
BANK_TRAINING = bank_config()

# `generate --refine N`'s fine-tune of the composed adapter (--refine-method finetune): the bank's recipe for fewer
# steps, with a warmup to match; chosen on the leave-one-out benchmark (README, Quality: on all 53 tasks 16 steps
# closed 75.4% of the gap, 10 steps 73.8%, 24 steps 73.1%).
REFINE_TRAINING = replace(BANK_TRAINING, steps=16, warmup=2)
