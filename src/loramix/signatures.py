"""Stage 2: signatures. A dataset becomes an empirical distribution that distances can compare:
`unigram` gives token ids (1-D int32, the paper's), `embed` and `hidden` give point clouds ([n, d] float32)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from typing import ClassVar, Literal

import numpy as np

from .arguments import check_fields, check_seed, checked
from .data import Dataset
from .encoder import DEFAULT_EMBED_MODEL, Encoder
from .errors import LoramixError
from .registry import Registry
from .threads import threaded_map

# Bumped when a signer's output changes for the same spec, so cached signatures are recomputed.
# 2, 3: embed / hidden batches fixed by the data alone, each on one thread (bytes independent of the thread count);
# embed batches of 16 (fastest on 2 cores). 4: the encoder run on transformers alone (_Encoder; vectors within 1e-8
# of sentence-transformers', not always the same bytes). 5: BERT encoders in plain torch (_Bert; within 1e-6).
_SIGNATURE_VERSION = 5


@dataclass(frozen=True)
class SignatureSpec:
    """What signature to compute: `method` (a SIGNATURES name; the default is `generate`'s); `model`
    (sentence-transformers model for embed / embed-io, base model for unigram / hidden); at most `max_samples`
    samples per dataset, drawn with `seed`."""

    method: str = "embed-io"
    model: str | None = None
    max_samples: int | None = 128
    seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("max_samples", "seed"):  # a numpy integer is the int it holds (the key is JSON)
            if isinstance(getattr(self, name), np.integer):
                object.__setattr__(self, name, int(getattr(self, name)))
        check_seed("SignatureSpec: ", self.seed)
        if self.max_samples is not None and self.max_samples < 1:
            raise LoramixError(f"max-samples must be at least 1, got {self.max_samples}")

    def resolved(self, base_model: str | None) -> "SignatureSpec":
        """This spec with `model` filled in: the default embedder, or the bank's base model."""
        if self.model is not None:
            return self
        return replace(self, model=base_model if SIGNATURES.get(self.method).needs_base else DEFAULT_EMBED_MODEL)

    def key(self) -> str:
        """A short name that changes whenever the spec (or the signer's code version) does: `<method>-<hash>`."""
        blob = json.dumps({**asdict(self), "v": _SIGNATURE_VERSION}, sort_keys=True)
        return f"{self.method}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


class Signer:
    """Computes one kind of signature; holds its (lazily loaded) model across datasets."""

    kind: ClassVar[Literal["tokens", "cloud"]]
    needs_base: ClassVar[bool] = False

    def __init__(self, spec: SignatureSpec):
        self.spec = spec

    def __call__(self, dataset: Dataset) -> np.ndarray:
        return self.compute(dataset.subsample(self.spec.max_samples, self.spec.seed))

    def compute(self, dataset: Dataset) -> np.ndarray:
        raise NotImplementedError


SIGNATURES: Registry[type[Signer]] = Registry("signature")


@checked
def make_signer(spec: SignatureSpec) -> Signer:
    return SIGNATURES.get(spec.method)(spec)


@SIGNATURES.register("unigram")
class UnigramSigner(Signer):
    """The paper's: `input + output` of every sample tokenised by the base tokenizer, all ids concatenated.
    Returns int32 [total_tokens]."""

    kind = "tokens"
    needs_base = True

    def compute(self, dataset: Dataset) -> np.ndarray:
        from .runtime.pytorch import load_tokenizer

        tokenizer = load_tokenizer(self.spec.model)
        ids = tokenizer([s.input + s.output for s in dataset])["input_ids"]
        return np.concatenate([np.asarray(x, dtype=np.int32) for x in ids])


def _texts(dataset: Dataset) -> list[str]:
    return [f"{s.input}\n{s.output}" for s in dataset]


def _batches(lengths: list[int], size: int) -> list[list[int]]:
    """Sample indices, longest first (ties in sample order), cut into batches of `size`: which samples share a
    batch (hence a padded width) depends on the data alone, never on the number of threads."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + size] for i in range(0, len(order), size)]


def _gather(batches: list[list[int]], parts: list[np.ndarray]) -> np.ndarray:
    """The per-batch rows put back in sample order: float32 [n, d]."""
    out = np.empty((sum(len(b) for b in batches), parts[0].shape[1]), dtype=np.float32)
    for idx, rows in zip(batches, parts):
        out[idx] = rows
    return out


@SIGNATURES.register("embed")
class EmbedSigner(Signer):
    """Sentence embeddings (L2-normalised) of `input \\n output` per sample. Returns float32 [n, d].
    Batches of `batch_size` samples of similar length run in parallel threads, each on one thread."""

    kind = "cloud"
    batch_size = 16
    _model: Encoder | None = None

    def compute(self, dataset: Dataset) -> np.ndarray:
        return self._embed(_texts(dataset))

    def _embed(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), d], L2-normalised rows."""
        if self._model is None:
            self._model = Encoder(self.spec.model or DEFAULT_EMBED_MODEL)
        batches = _batches([len(t) for t in texts], self.batch_size)
        return _gather(batches, list(threaded_map(lambda idx: self._model([texts[i] for i in idx]), batches)))


@SIGNATURES.register("embed-io")
class EmbedIOSigner(EmbedSigner):
    """The mapping, not only the topic: per sample the sentence embedding of its input and that of its output,
    side by side and scaled by 1/sqrt(2) (unit rows). Returns float32 [n, 2 d]. Two tasks on the same topic in
    opposite directions (numbers to words, words to numbers) share their points' halves crosswise, not in place."""

    def compute(self, dataset: Dataset) -> np.ndarray:
        n = len(dataset)
        emb = self._embed([s.input for s in dataset] + [s.output for s in dataset])
        return (np.concatenate([emb[:n], emb[n:]], axis=1) / np.sqrt(2.0)).astype(np.float32)


@SIGNATURES.register("hidden")
class HiddenSigner(Signer):
    """The base model's last hidden states, mean-pooled over each sample's tokens (`input \\n output`,
    at most 256 tokens). Returns float32 [n, hidden_size]. Batches as `embed`'s, each on one thread."""

    kind = "cloud"
    needs_base = True
    batch_size = 16
    max_tokens = 256
    _model = None

    def compute(self, dataset: Dataset) -> np.ndarray:
        import torch

        from .runtime.pytorch import load_model, load_tokenizer
        from .prompts import pad_id

        tokenizer = load_tokenizer(self.spec.model)
        if self._model is None:
            self._model = load_model(self.spec.model, causal_lm=False)
        pad = pad_id(tokenizer)
        enc = [tokenizer(t, truncation=True, max_length=self.max_tokens)["input_ids"] for t in _texts(dataset)]
        batches = _batches([len(x) for x in enc], self.batch_size)

        def forward(idx: list[int]) -> np.ndarray:
            width = max(len(enc[i]) for i in idx)
            ids = torch.tensor([enc[i] + [pad] * (width - len(enc[i])) for i in idx])
            mask = torch.tensor([[1] * len(enc[i]) + [0] * (width - len(enc[i])) for i in idx])
            with torch.inference_mode():
                hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(hidden.dtype)
            return ((hidden * m).sum(1) / m.sum(1)).float().numpy()

        return _gather(batches, list(threaded_map(forward, batches)))
