"""Helpers the tests share: topic datasets, tiny PEFT-layout adapters and banks built in place (no downloads)."""

from __future__ import annotations

import json
import random
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from loramix.adapter import lora_config, pattern_value

TOPICS = {
    "animals": "cat dog horse cow sheep goat lion tiger bear wolf fox rabbit mouse eagle owl",
    "colors": "red green blue yellow purple orange pink brown black white gray violet indigo cyan magenta",
    "fruits": "apple banana cherry grape lemon mango melon peach pear plum kiwi lime papaya fig date",
    "numbers": "one two three four five six seven eight nine ten eleven twelve twenty thirty hundred",
    "countries": "france spain italy germany japan china brazil canada mexico india egypt kenya peru chile norway",
    "tools": "hammer saw drill wrench pliers screwdriver chisel shovel rake axe ladder level file clamp vise",
    "emotions": "happy sad angry afraid calm proud jealous bored excited nervous lonely grateful hopeful shy glad",
    "weather": "rain snow wind storm sunny cloudy fog hail thunder lightning drizzle frost heat humid breeze",
    "music": "guitar piano violin drum flute trumpet cello harp song melody rhythm chord tempo choir opera",
    "sports": "soccer tennis golf rugby hockey cricket boxing rowing skiing surfing cycling running diving judo polo",
}
WORDS = sorted({w for ws in TOPICS.values() for w in ws.split()} | {"list", "some", "words", "about", "give", "me"})


def topic_records(topic: str, n: int = 24, seed: int = 0) -> list[dict]:
    rng = random.Random(f"{topic}-{seed}")
    words = TOPICS[topic].split()
    return [
        {"input": f"give me some {topic} words about {rng.choice(words)}", "output": [" ".join(rng.sample(words, 3))]}
        for _ in range(n)
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# modules of the tiny Llama below: hidden 32, 4 heads of 8, 2 kv heads -> q [32, 32], k and v [16, 32]
TINY_SHAPES = {
    f"model.layers.{i}.self_attn.{p}": (32 if p == "q_proj" else 16, 32) for i in range(2) for p in ("q_proj", "k_proj", "v_proj")
}


def write_adapter(
    folder: Path,
    *,
    rank: int = 4,
    alpha: float = 8,
    shapes: dict[str, tuple[int, int]] = TINY_SHAPES,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    use_rslora: bool = False,
    base: str | None = "tiny-base",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    config_extra: dict | None = None,
) -> Path:
    """A PEFT-layout LoRA adapter with random A and B (both non-zero)."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (out_f, in_f) in shapes.items():
        r = pattern_value(rank_pattern, name, rank)
        tensors[f"base_model.model.{name}.lora_A.weight"] = (torch.randn(r, in_f, generator=g) / in_f**0.5).to(dtype)
        tensors[f"base_model.model.{name}.lora_B.weight"] = (torch.randn(out_f, r, generator=g) / r**0.5).to(dtype)
    save_file(tensors, folder / "adapter_model.safetensors")
    cfg = lora_config(
        base_model=base, target_modules=sorted({n.rsplit(".", 1)[-1] for n in shapes}), r=rank, lora_alpha=alpha,
        use_rslora=use_rslora, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
    )
    cfg.update(config_extra or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return folder


def at_threads(n: int, fn):
    """fn() with torch set to n threads, the previous count restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(saved)


def make_bank(root: Path, n: int = 8, *, base: str | None = "tiny-base", mixed: bool = False, **kw) -> Path:
    """A bank of n adapters, one per topic, each with train.jsonl. `mixed`: vary ranks, patterns and rsLoRA."""
    root.mkdir(parents=True, exist_ok=True)
    for i, topic in enumerate(list(TOPICS)[:n]):
        opts = dict(kw)
        if mixed:
            opts.update(
                [
                    {},
                    {"rank": 2, "alpha": 16},
                    {"use_rslora": True},
                    {"rank_pattern": {"model.layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"v_proj": 3}},
                    {"rank": 8, "alpha": 4},
                ][i % 5]
            )
        write_adapter(root / f"task_{topic}", base=base, seed=i, **opts)
        write_jsonl(root / f"task_{topic}" / "train.jsonl", topic_records(topic, seed=i))
    return root


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`loramix ARGS` in this process, through main() (its one-line errors): (exit code, stdout, stderr), with the
    signal handlers main() installs restored."""
    from loramix.cli import main

    monkeypatch.setattr(sys, "argv", ["loramix", *args])
    monkeypatch.delenv("LORAMIX_DEBUG", raising=False)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    captured = capsys.readouterr()
    return code, captured.out, captured.err
