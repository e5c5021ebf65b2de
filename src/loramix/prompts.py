"""Prompts and answer batches for a causal LM: the base's chat template, the padding and end-of-turn tokens,
left-padded batches whose answers end every row, and a shared prompt prefix run once for a whole batch (SharedBatch:
the answer logits and loss that training, refinement and the check use).

Token ids are Python ints; batches are int64 tensors [B, L] (L the padded width), masks 1 on real tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import LoramixError

# (sequence ids: prompt + answer + end-of-turn, number of answer tokens at its end incl. end-of-turn)
Encoded = tuple[list[int], int]


def prompt_ids(tokenizer: Any, text: str, max_length: int | None = None) -> list[int]:
    """Token ids of `text` as a user turn in the base's chat template, ready for the answer to follow
    (plain text ids when the tokenizer has no chat template), at most `max_length` of them (the last ones: the
    turn's end and the generation prompt stay). Never empty: an empty prompt of a tokenizer that adds neither a
    template nor a bos token is its bos (else its eos) token alone, so the first answer token has a position to be
    predicted from."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # what Python makes of argv / stdin bytes that are not UTF-8
        raise LoramixError(f"the prompt is not UTF-8 text (byte {e.start}: a lone surrogate U+{ord(text[e.start]):04X})") from None
    if getattr(tokenizer, "chat_template", None):
        ids = _chat_ids(tokenizer, text)
    else:
        ids = list(tokenizer(text)["input_ids"])
    ids = ids[-max_length:] if max_length else ids
    return ids or [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else end_of_turn_id(tokenizer)]


TEMPLATE_SECONDS = 10.0  # one prompt's chat template rendering may take at most this long (they take milliseconds)


class _TemplateTimeout(Exception):
    """Raised inside a rendering thread that ran past TEMPLATE_SECONDS, to stop it."""


def _chat_ids(tokenizer: Any, text: str) -> list[int]:
    """`text` as a user turn through the base's chat template (a Jinja program the base's author wrote), bounded:
    rendered on a thread that is given TEMPLATE_SECONDS, then stopped; a template that runs longer (a loop that does
    not end) or fails (raise_exception, an undefined name, a type error, runaway recursion) is one LoramixError
    naming the base."""
    import ctypes
    import threading

    result: dict[str, Any] = {}

    def render() -> None:
        try:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            result["ids"] = list(ids)
        except BaseException as e:  # handed to the caller
            result["error"] = e

    worker = threading.Thread(target=render, name="loramix-chat-template", daemon=True)
    worker.start()
    worker.join(TEMPLATE_SECONDS)
    base = getattr(tokenizer, "name_or_path", None) or "?"
    if worker.is_alive():  # stop it at its next bytecode (Jinja templates compile to Python)
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker.ident), ctypes.py_object(_TemplateTimeout))
        raise LoramixError(f"base model {base!r}: its chat template took more than {TEMPLATE_SECONDS:g} s to render one "
                           "prompt (a loop that does not end?); fix or remove chat_template in its tokenizer_config.json")
    error = result.get("error")
    if isinstance(error, (LoramixError, KeyboardInterrupt, MemoryError)):
        raise error
    if error is not None:
        why = next((line.strip() for line in str(error).splitlines() if line.strip()), "")[:200]
        raise LoramixError(f"base model {base!r}: its chat template fails to render a prompt "
                           f"({type(error).__name__}{': ' + why if why else ''})") from None
    return result["ids"]


def prompt_room(model: Any, max_new_tokens: int) -> int | None:
    """The longest prompt (tokens) that leaves `max_new_tokens` within the model's context (max_position_embeddings;
    None when the config does not say), at least 1."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return max(1, context - max_new_tokens) if isinstance(context, int) else None


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
        prompt = prompt_ids(tokenizer, s.input, max(1, max_length - len(answer)))
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


@dataclass(frozen=True)
class SharedBatch:
    """Labelled sequences laid out to run their shared prompt prefix once: `prefix` ids [1, p], every row's other
    tokens `rest` [B, L - p] with their `positions` [B, L - p], the attention `mask` [B, L] over prefix and rest,
    and the answer `targets` [B, K] (`answer_batch`'s). p stops before each answer's preceding token, whose logits
    predict the answer."""

    prefix: torch.Tensor
    rest: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def of(cls, items: list[Encoded], pad: int) -> SharedBatch:
        """The batch of `encode`d items, padded with `pad`."""
        p = min(common_prefix([seq for seq, _ in items]), *(len(seq) - n - 1 for seq, n in items))
        ids, mask, targets = answer_batch(items, pad, p)
        positions = (p + mask[:, p:].cumsum(1) - 1).clamp(min=0)
        return cls(ids[:1, :p], ids[:, p:].contiguous(), positions, mask, targets)

    @property
    def tokens(self) -> int:
        """The token positions one forward pass runs: the prefix once and every row's rest, padding included."""
        return self.prefix.shape[1] + self.rest.numel()

    def to(self, device: Any) -> SharedBatch:
        return SharedBatch(*(t.to(device) for t in (self.prefix, self.rest, self.positions, self.mask, self.targets)))

    def logits(self, model: Any) -> torch.Tensor:
        """The answer positions' logits [B, K, vocab] (differentiable): the prefix once, its key/value cache serving
        every row; the same logits as running each row whole, for a fraction of the tokens."""
        k = self.targets.shape[1]
        extra = prefix_cache(model, self.prefix, self.rest.shape[0])
        return model(input_ids=self.rest, attention_mask=self.mask, position_ids=self.positions, logits_to_keep=k + 1,
                     **extra).logits[:, :-1]

    def loss(self, model: Any) -> torch.Tensor:
        """The mean answer-token cross-entropy (nats per token, a differentiable scalar)."""
        out = self.logits(model)
        return torch.nn.functional.cross_entropy(out.float().reshape(-1, out.shape[-1]), self.targets.reshape(-1))
