"""Prompts and answer batches for a causal LM: the base's chat template, the padding and end-of-turn tokens,
left-padded batches whose answers end every row, and a shared prompt prefix run once for a whole batch.

Token ids are Python ints; batches are int64 tensors [B, L] (L the padded width), masks 1 on real tokens."""

from __future__ import annotations

from typing import Any

import torch

from .errors import LoramixError

# (sequence ids: prompt + answer + end-of-turn, number of answer tokens at its end incl. end-of-turn)
Encoded = tuple[list[int], int]


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` as a user turn in the base's chat template, ready for the answer to follow
    (plain text ids when the tokenizer has no chat template)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(text)["input_ids"]


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends an answer: the eos token (SmolLM2's <|im_end|>)."""
    if tokenizer.eos_token_id is None:
        raise LoramixError("the base tokenizer has no eos token to end answers with")
    return tokenizer.eos_token_id


def pad_id(tokenizer: Any) -> int:
    """The padding token: the tokenizer's own, else the end-of-turn token (always masked out)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)


def encode(tokenizer: Any, samples: Any, max_length: int) -> list[Encoded]:
    """Per sample (anything with `.input` and `.output`): (prompt ids + answer ids + end-of-turn, number of answer
    tokens incl. end-of-turn), at most `max_length` ids, cut from the left of the prompt so the answer always fits
    (itself cut to max_length // 2 tokens)."""
    eot = end_of_turn_id(tokenizer)
    out = []
    for s in samples:
        answer = tokenizer(s.output, add_special_tokens=False)["input_ids"][: max_length // 2] + [eot]
        prompt = prompt_ids(tokenizer, s.input)[-(max_length - len(answer)) :]
        out.append((prompt + answer, len(answer)))
    return out


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest prefix all `seqs` share, leaving each at least one token of its own."""
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for k in range(max(n, 0)):
        if any(s[k] != first[k] for s in seqs):
            return k
    return max(n, 0)


def left_padded(seqs: list[list[int]], pad: int, prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, L] and attention mask [B, L] laid out as [shared prefix][padding][own tokens]: the first `prefix`
    tokens (which every sequence shares) once at the start, each sequence's other tokens at the right end, so
    that positions stay contiguous; L = prefix + the longest own part."""
    width = prefix + max(len(s) - prefix for s in seqs)
    ids = torch.full((len(seqs), width), pad)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    ids[:, :prefix] = torch.tensor(seqs[0][:prefix])
    mask[:, :prefix] = 1
    for row, seq in enumerate(seqs):
        ids[row, width - (len(seq) - prefix) :] = torch.tensor(seq[prefix:])
        mask[row, width - (len(seq) - prefix) :] = 1
    return ids, mask


def answer_batch(items: list[Encoded], pad: int, prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`left_padded` ids [B, L] and mask [B, L] of the sequences, and their answer targets [B, K] over the last K
    positions (-100 before each row's answer), K = the longest answer: left padding puts every answer at the end."""
    ids, mask = left_padded([seq for seq, _ in items], pad, prefix)
    k = max(n for _, n in items)
    targets = torch.full((len(items), k), -100)
    for row, (seq, n) in enumerate(items):
        targets[row, k - n :] = torch.tensor(seq[-n:])
    return ids, mask, targets


def prefix_cache(model: Any, prefix: torch.Tensor, rows: int) -> dict[str, Any]:
    """Run the shared prefix [1, p] once; returns the keyword argument (its key/value cache repeated for `rows`
    rows) that makes the model's next forward or generate call continue from it; {} when p is 0."""
    if prefix.shape[1] == 0:
        return {}
    run = model(input_ids=prefix, use_cache=True)
    key = "cache" if "cache" in run else "past_key_values"  # transformers >= 5.20 renamed it
    run[key].batch_repeat_interleave(rows)
    return {key: run[key]}
