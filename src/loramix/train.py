"""An ordinary PEFT LoRA fine-tune, the upper bound loramix is measured against and how banks are built:
the base's chat template, loss on the answer tokens only, seeded, bf16 autocast where the device runs bf16 natively, a GPU when there is one."""

from __future__ import annotations

import json
import math
import random
import re
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from .adapter import DTYPES
from .arguments import checked
from .data import Dataset, read_dataset
from .errors import LoramixError, setting
from .files import atomic_dir, refuse_target
from .runtime import base_paths
from .runtime.pytorch import DEFAULT_BASE, load_model, load_tokenizer, quiet_loading, with_adapter
from .progress import track
from .runtime.memory import bf16_native
from .prompts import SharedBatch, encode, pad_id
from .train_config import TrainConfig

TRAINING_FILE = "training.json"


@checked
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
                                            "the base model": base_paths(base)})
    if init is not None:
        refuse_other_base(init, base)
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
        _refuse_rank_beyond_modules(model, config)  # before PEFT allocates [rank, in] and [out, rank] per module
        try:
            with quiet_loading():
                model = get_peft_model(model, lora)
        except ValueError as e:  # e.g. no module of the base matches --target-modules
            why = re.sub(r"(\w+)\(\n.*?\n\)", r"\1", str(e), flags=re.DOTALL)  # a module's repr: its class name
            raise LoramixError(f"{setting('target_modules', ','.join(config.target_modules))}: {' '.join(why.split())[:300]}") from None
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
            if step > 0 and (step >= total or elapsed > config.budget):  # at least one step, as --max-tokens
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
        raise LoramixError(f"{dataset.source}: training diverged (loss is not finite); try a lower {setting('lr')}")

    used = model.peft_config["default"]  # with init: the init's rank, alpha, patterns and modules, not config's
    record = {
        "config": config.as_record(),
        "lora": {"r": used.r, "lora_alpha": used.lora_alpha, "use_rslora": bool(used.use_rslora),
                 "rank_pattern": dict(used.rank_pattern or {}), "alpha_pattern": dict(used.alpha_pattern or {}),
                 "target_modules": sorted(used.target_modules) if not isinstance(used.target_modules, str) else used.target_modules},
        "base_model": model.peft_config["default"].base_model_name_or_path,
        "base_identity": _base_identity(base),
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
        sort_config(tmp / "adapter_config.json")
        _cast_weights(tmp / "adapter_model.safetensors", config.save_dtype)
        # the same data, settings and seed give the same bytes: the wall-clock seconds are returned, not written
        written = {k: v for k, v in record.items() if k not in UNWRITTEN}
        (tmp / TRAINING_FILE).write_text(json.dumps(written, indent=1) + "\n", encoding="utf-8")
    return record


UNWRITTEN = ("seconds",)  # in the record train returns, not in training.json: it differs from run to run


def _base_identity(base: str | None) -> str | None:
    from .runtime import base_identity

    return base_identity(base)


def sort_config(path: Path) -> None:
    """Rewrite a PEFT adapter_config.json with its set-valued fields (target_modules, exclude_modules: Python sets
    in PEFT, saved in an order that follows the hash seed) sorted and the rest as PEFT wrote it (its key order: the
    patterns' order is meaningful), so that reruns give the same bytes."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def _refuse_rank_beyond_modules(model: Any, config: TrainConfig) -> None:
    """Refuse a --rank above what the modules --target-modules selects can hold (the largest min(in, out)): its
    factors would be allocated (rank x (in + out) per module) for singular values that do not exist."""
    sides = [min(m.in_features, m.out_features) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in config.target_modules]
    if sides and config.rank > max(sides):
        raise LoramixError(f"{setting('rank', config.rank)} is more than the modules "
                           f"{setting('target_modules', ','.join(config.target_modules))} selects can hold (at most "
                           f"{max(sides)}: min(in, out)); pass {setting('rank', max(sides))} or less")


def base_name(base: str | Path | None) -> str:
    """How an adapter trained here names its base (base_model_name_or_path): the default base by its hub id, a local
    folder or file by its absolute path, anything else (a hub id) as given; the two forms of each compared as one."""
    if base in (None, "default", DEFAULT_BASE):
        return DEFAULT_BASE
    if Path(base).is_dir() or Path(base).is_file():
        local = Path(base).resolve()
        # the default's converted folder and shipped GGUF are the default
        return DEFAULT_BASE if local in [p.resolve() for p in base_paths(None)] else str(local)
    return str(base).rstrip("/")


def refuse_other_base(init: str | Path, base: str | Path | None) -> None:
    """Refuse an `init` adapter whose config names a base model other than `base` (the one training runs on): its
    factors were made for another model's weights, and the trained adapter would be labelled with a base it was not
    made for. An init that names no base is taken as it is."""
    from .adapter import base_model_of

    named = base_model_of(init)
    if not named:
        return
    if base_name(named) != base_name(base):
        raise LoramixError(f"{init}: adapter_config.json field 'base_model_name_or_path' is {named!r}, but training runs "
                           f"on base model {base_name(base)!r}: its factors were made for another model; train on its "
                           f"base ({setting('base', named)}) or without init")


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
