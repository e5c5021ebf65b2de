"""An ordinary PEFT LoRA fine-tune, the upper bound loramix is measured against and how banks are built:
the base's chat template, loss on the answer tokens only, seeded, bf16 autocast where the device runs bf16 natively, a GPU when there is one."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from .adapter import DTYPES
from .data import Dataset, read_dataset
from .errors import LoramixError
from .files import atomic_dir, refuse_target
from .models import DEFAULT_BASE, load_model, load_tokenizer, quiet_loading, with_adapter
from .progress import track
from .runtime.memory import bf16_native
from .prompts import SharedBatch, encode, pad_id
from .train_config import TrainConfig

TRAINING_FILE = "training.json"


def train(
    data: str | Path | Dataset,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    base: str | None = None,
    init: str | Path | None = None,
    model: Any = None,
    tokenizer: Any = None,
    force: bool = False,
) -> dict[str, Any]:
    """Fine-tune a LoRA on `data` (its `output` is the target) and write a PEFT adapter folder to `out`,
    with `training.json` (settings, the LoRA shape actually trained under "lora", loss per step, seconds). Returns
    that record. `init`: a PEFT adapter folder of
    the same base (e.g. a composed one) whose factors training starts from; its rank, alpha and modules replace
    `config`'s. `model`, `tokenizer`: `base` already loaded (the model gains the LoRA layers and is trained in place)."""
    from peft import LoraConfig, get_peft_model

    config = config or TrainConfig()
    refuse_target(out, force=force, inputs={"the data": None if isinstance(data, Dataset) else data, "--init": init,
                                            "the base model": base})
    dataset = data if isinstance(data, Dataset) else read_dataset(data)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(base)
    model = (model if model is not None else load_model(base)).to(device)
    lora = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=list(config.target_modules), task_type="CAUSAL_LM",
    )
    if init is None:
        try:
            with quiet_loading():
                model = get_peft_model(model, lora)
        except ValueError as e:  # e.g. no module of the base matches --target-modules
            raise LoramixError(f"--target-modules {','.join(config.target_modules)}: {str(e).splitlines()[0][:300]}") from None
    else:
        model = with_adapter(model, init, base, is_trainable=True)
        if all(not bool(p.any()) for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n):
            # B's gradient is (dL/dh) (A x)^T and A's is B^T (...): with A and B both zero, neither moves
            raise LoramixError(f"{init}: its update is zero in every module (lora_A and lora_B are 0), so training "
                               "cannot move it; train without init (a fresh LoRA)")
    model.peft_config["default"].base_model_name_or_path = (  # a local folder by its absolute path: found from anywhere
        DEFAULT_BASE if base in (None, "default") else str(Path(base).resolve()) if Path(base).is_dir() else base)
    encoded = encode(tokenizer, dataset, config.max_length)
    pad = pad_id(tokenizer)
    bf16 = config.bf16 and bf16_native(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)

    plan = plan_batches(len(encoded), config)  # lazily: steps may be many, with a budget
    total = config.steps  # shortened to what fits the budget once the warmup's step time is known
    if config.max_tokens is not None:  # the first steps whose token positions sum to at most max_tokens, at least one
        kept, used = [], 0
        for picked in plan:
            used += SharedBatch.of([encoded[i] for i in picked], pad).tokens
            if used > config.max_tokens and kept:
                break
            kept.append(picked)
        plan, total = iter(kept), len(kept)

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, total - config.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses = []
    start = time.perf_counter()
    model.train()
    for step, picked in enumerate(track(plan, "training LoRA", total=total)):
        if config.budget is not None:
            elapsed = time.perf_counter() - start
            if step == max(config.warmup, 1):
                total = min(total, max(step + 1, int(config.budget / (elapsed / step))))
            if step >= total or elapsed > config.budget:
                break
        batch = SharedBatch.of([encoded[i] for i in picked], pad).to(device)  # the shared prompt prefix runs once
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = batch.loss(model)  # in float32 (cross-entropy runs in float32 under autocast)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    if not all(math.isfinite(x) for x in losses):
        raise LoramixError(f"{dataset.source}: training diverged (loss is not finite); try a lower --lr")

    used = model.peft_config["default"]  # with init: the init's rank, alpha, patterns and modules, not config's
    record = {
        "config": config.as_record(),
        "lora": {"r": used.r, "lora_alpha": used.lora_alpha, "use_rslora": bool(used.use_rslora),
                 "rank_pattern": dict(used.rank_pattern or {}), "alpha_pattern": dict(used.alpha_pattern or {}),
                 "target_modules": sorted(used.target_modules) if not isinstance(used.target_modules, str) else used.target_modules},
        "base_model": model.peft_config["default"].base_model_name_or_path,
        "data": {"path": dataset.source, "samples": len(dataset), "fingerprint": dataset.fingerprint()},
        "init": str(init) if init is not None else None,
        "device": device.type,
        "autocast": "bfloat16" if bf16 else None,
        "seconds": round(seconds, 2),
        "loss": [round(x, 5) for x in losses],
    }
    with atomic_dir(out, force=force) as tmp, quiet_loading():
        model.save_pretrained(tmp, save_embedding_layers=False)  # LoRA weights only; no hub look-up
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
        _cast_weights(tmp / "adapter_model.safetensors", config.save_dtype)
        (tmp / TRAINING_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def plan_batches(n: int, config: TrainConfig) -> Iterator[list[int]]:
    """The sample indices (of `n`) of each of `config.steps` training steps, in order: epochs of seeded shuffles,
    without replacement within one."""
    rng = random.Random(config.seed)
    order: list[int] = []
    for _ in range(config.steps):
        if len(order) < config.batch_size:
            order += rng.sample(range(n), n)
        yield order[: config.batch_size]
        order = order[config.batch_size :]


def _cast_weights(path: Path, dtype: str) -> None:
    """Rewrite a safetensors file with every tensor cast to `dtype`."""
    from safetensors.torch import load_file, save_file

    target = DTYPES[dtype]
    tensors = load_file(path)
    if any(t.dtype != target for t in tensors.values()):
        save_file({k: v.to(target).contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
