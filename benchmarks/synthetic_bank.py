"""A synthetic bank with Mistral-7B-Instruct-v0.2 shapes, laid out like Lots-of-LoRAs, for speed and memory
measurements (never quality): 32 layers, q_proj [4096, 4096], k_proj and v_proj [1024, 4096], rank 16,
lora_alpha 32, float32 (37.8 MB per adapter), each entry with a small train.jsonl.

    python benchmarks/synthetic_bank.py --n 500 [--out DIR]

Written to $LORAMIX_HOME/bench/mistral-bank-<n> by default (outside the repository); resumable."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from loramix.adapter import CONFIG_FILE, WEIGHTS_FILE, SafetensorsWriter, lora_config
from loramix.files import atomic_dir
from loramix.paths import loramix_home
from loramix.progress import track

LAYERS, HIDDEN, KV, RANK, ALPHA = 32, 4096, 1024, 16, 32
BASE = "mistralai/Mistral-7B-Instruct-v0.2"
SHAPES = {f"model.layers.{i}.self_attn.{p}": (HIDDEN if p == "q_proj" else KV, HIDDEN) for i in range(LAYERS) for p in ("q_proj", "k_proj", "v_proj")}
# Pseudo-words in 20 topics: each entry's data mixes two topics, so that distances differ between entries.
TOPICS = [[f"{t}{chr(97 + (i * 7 + t) % 26)}{chr(97 + (i * 3 + 2 * t) % 26)}{i}" for i in range(40)] for t in range(20)]


def default_dir(n: int) -> Path:
    return loramix_home() / "bench" / f"mistral-bank-{n}"


def records(seed: int, samples: int) -> list[dict]:
    rng = random.Random(seed)
    words = TOPICS[seed % 20] + TOPICS[(seed * 7 + 3) % 20]
    return [
        {"input": " ".join(rng.choices(words, k=rng.randint(8, 20))), "output": [" ".join(rng.choices(words, k=3))]}
        for _ in range(samples)
    ]


def write_entry(folder: Path, seed: int, samples: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with atomic_dir(folder, force=True) as tmp:
        specs = {}
        for m, (out_f, in_f) in SHAPES.items():
            specs[f"base_model.model.{m}.lora_A.weight"] = (torch.float32, (RANK, in_f))
            specs[f"base_model.model.{m}.lora_B.weight"] = (torch.float32, (out_f, RANK))
        with SafetensorsWriter(tmp / WEIGHTS_FILE, specs) as w:
            for m, (out_f, in_f) in SHAPES.items():
                w.write(f"base_model.model.{m}.lora_A.weight", torch.randn(RANK, in_f, generator=g) / in_f**0.5)
                w.write(f"base_model.model.{m}.lora_B.weight", torch.randn(out_f, RANK, generator=g) * 0.01)
        cfg = lora_config(base_model=BASE, target_modules=["k_proj", "q_proj", "v_proj"], r=RANK, lora_alpha=ALPHA)
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(seed, samples)), encoding="utf-8")


def build(n: int, out: Path | None = None, samples: int = 100) -> Path:
    """Write (or complete) a synthetic bank of n entries; returns its folder."""
    out = out or default_dir(n)
    out.mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(n) if not (out / f"task{i:04d}" / "train.jsonl").is_file()]
    for i in track(todo, f"synthetic bank ({n} entries)", total=len(todo)):
        write_entry(out / f"task{i:04d}", i, samples)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--out", type=Path)
    p.add_argument("--samples", type=int, default=100)
    args = p.parse_args()
    print(build(args.n, args.out, args.samples))


if __name__ == "__main__":
    main()
