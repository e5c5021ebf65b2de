import subprocess
import sys

import numpy as np
import pytest
from helpers import topic_records

from loramix import Dataset, Sample, SignatureSpec, make_signer
from loramix.signatures import DEFAULT_EMBED_MODEL


def dataset(topic: str, n: int = 12) -> Dataset:
    return Dataset([Sample(r["input"], tuple(r["output"])) for r in topic_records(topic, n)], topic)


def test_unigram_is_the_tokenizer_ids_of_input_plus_output(tiny_base):
    from transformers import AutoTokenizer

    ds = dataset("colors", 5)
    sig = make_signer(SignatureSpec("unigram", str(tiny_base)))(ds)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    want = np.concatenate([tok(s.input + s.output)["input_ids"] for s in ds])
    assert sig.dtype == np.int32 and np.array_equal(sig, want)


def test_embed_default_model_is_offline_minilm():
    spec = SignatureSpec("embed").resolved(None)
    assert spec.model == DEFAULT_EMBED_MODEL
    sig = make_signer(spec)(dataset("fruits"))
    assert sig.shape == (12, 384) and sig.dtype == np.float32
    assert np.allclose(np.linalg.norm(sig, axis=1), 1, atol=1e-5)


TEXTS = ["hello world", "  padded with spaces  \n", "A" * 3000, "", "Ünïcödé 日本語 ✓", "one two three " * 60, "MiXeD"]


def test_the_default_encoder_gives_sentence_transformers_vectors_without_importing_it():
    """all-MiniLM-L6-v2 runs as plain torch (no sentence-transformers, no transformers) with the same vectors."""
    from sentence_transformers import SentenceTransformer

    from loramix.encoder import Encoder, embedder_path

    encoder = Encoder(DEFAULT_EMBED_MODEL)
    assert encoder._st is None and encoder._bert is not None  # plain torch
    want = SentenceTransformer(embedder_path(DEFAULT_EMBED_MODEL), device="cpu").encode(
        TEXTS, batch_size=len(TEXTS), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    np.testing.assert_allclose(encoder(TEXTS), want, atol=1e-6)
    code = ("import sys; from loramix import make_signer, SignatureSpec, Dataset, Sample; "
            "make_signer(SignatureSpec('embed-io').resolved(None))(Dataset([Sample('a', ('b',))], 'x')); "
            "print('sentence_transformers' in sys.modules, 'transformers' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "False False", p.stderr  # BERT in plain torch (_Bert)


@pytest.mark.parametrize("change,plain", [
    ({}, True),
    ({"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}, True),
    ({"pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}, True),
    ({"pooling_mode_mean_sqrt_len_tokens": True}, False),  # two poolings side by side
    ({"pooling_mode_mean_tokens": False, "pooling_mode_weightedmean_tokens": True}, False),
    ("dense", False),
])
def test_other_sentence_transformers_models_keep_their_vectors(tmp_path, change, plain):
    """A copy of the default model with another pooling or a Dense layer: run on transformers alone when Encoder can
    compute it, through sentence-transformers otherwise, and the vectors are sentence-transformers' either way."""
    import json
    import shutil

    from sentence_transformers import SentenceTransformer

    from loramix.encoder import Encoder, embedder_path

    folder = tmp_path / "model"
    shutil.copytree(embedder_path(DEFAULT_EMBED_MODEL), folder)
    if change == "dense":
        from sentence_transformers.models import Dense

        st = SentenceTransformer(str(folder), device="cpu")
        st.append(Dense(384, 16))
        shutil.rmtree(folder)
        st.save(str(folder))
    else:
        pooling = folder / "1_Pooling" / "config.json"
        pooling.write_text(json.dumps({**json.loads(pooling.read_text()), **change}))
    encoder = Encoder(str(folder))
    assert (encoder._st is None) == plain
    want = SentenceTransformer(str(folder), device="cpu").encode(
        TEXTS, batch_size=len(TEXTS), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    np.testing.assert_allclose(encoder(TEXTS), want, atol=1e-6)


def test_embed_separates_topics():
    signer = make_signer(SignatureSpec("embed").resolved(None))
    a, a2, b = signer(dataset("fruits")), signer(Dataset(dataset("fruits", 24).samples[12:], "f2")), signer(dataset("tools"))
    from loramix.distances.clouds import w2

    assert w2(a, a2) < w2(a, b)


def test_hidden_is_mean_pooled_base_states(tiny_base):
    spec = SignatureSpec("hidden", str(tiny_base), max_samples=5)
    sig = make_signer(spec)(dataset("music"))
    assert sig.shape == (5, 32) and np.isfinite(sig).all()


def test_max_samples_caps_the_cloud():
    signer = make_signer(SignatureSpec("embed", max_samples=4, seed=3).resolved(None))
    assert signer(dataset("sports")).shape == (4, 384)


def test_needs_base_resolution():
    assert SignatureSpec("unigram").resolved("org/base").model == "org/base"
    assert SignatureSpec("hidden", "mine").resolved("org/base").model == "mine"
    with pytest.raises(Exception, match="unknown signature"):
        make_signer(SignatureSpec("nope"))


def test_embed_io_puts_input_and_output_embeddings_side_by_side():
    ds = dataset("fruits", 6)
    sig = make_signer(SignatureSpec("embed-io").resolved(None))(ds)
    assert sig.shape == (6, 768) and sig.dtype == np.float32
    assert np.allclose(np.linalg.norm(sig, axis=1), 1, atol=1e-5)
    plain = make_signer(SignatureSpec("embed").resolved(None))
    assert np.allclose(sig[:, :384] * np.sqrt(2), plain._embed([s.input for s in ds]), atol=1e-5)
    assert np.allclose(sig[:, 384:] * np.sqrt(2), plain._embed([s.output for s in ds]), atol=1e-5)


def test_embed_io_tells_a_mapping_from_its_inverse():
    """Same topic, opposite direction: plain embed sees the same texts, embed-io does not."""
    from loramix.distances.clouds import w2

    ds = dataset("fruits", 12)
    flipped = Dataset([Sample(s.output, (s.input,)) for s in ds], "flipped")
    embed = make_signer(SignatureSpec("embed").resolved(None))
    io = make_signer(SignatureSpec("embed-io").resolved(None))
    assert w2(io(ds), io(flipped)) > 3 * w2(embed(ds), embed(flipped))


def test_a_transformer_that_is_not_plain_bert_runs_through_transformers(tmp_path):
    """A model _Bert does not describe exactly (here: no tokenizer.json) runs through transformers, same vectors."""
    import shutil

    from sentence_transformers import SentenceTransformer

    from loramix.encoder import Encoder, embedder_path

    folder = tmp_path / "model"
    shutil.copytree(embedder_path(DEFAULT_EMBED_MODEL), folder)
    (folder / "tokenizer.json").unlink()
    encoder = Encoder(str(folder))
    assert encoder._st is None and encoder._bert is None
    want = SentenceTransformer(str(folder), device="cpu").encode(
        TEXTS, batch_size=len(TEXTS), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    np.testing.assert_allclose(encoder(TEXTS), want, atol=1e-6)


@pytest.mark.parametrize("damage,message", [
    ("weights", "model.safetensors: .*header"),
    ("tokenizer", "tokenizer.json: "),
    ("heads", "config.json: hidden_size 256 is not a multiple of num_attention_heads 12"),
    ("shape", r"model.safetensors: tensor 'embeddings.word_embeddings.weight' is \[30522, 384\], the config wants \['any', 240\]"),
])
def test_a_damaged_embedding_model_is_one_line_naming_the_file(tmp_path, damage, message):
    import json
    import shutil

    from loramix import LoramixError
    from loramix.encoder import Encoder, embedder_path

    folder = tmp_path / "model"
    shutil.copytree(embedder_path(DEFAULT_EMBED_MODEL), folder)
    if damage == "weights":
        (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    elif damage == "tokenizer":
        (folder / "tokenizer.json").write_text('{"bad": ')
    else:
        config = json.loads((folder / "config.json").read_text())
        config["hidden_size"] = 256 if damage == "heads" else 240
        (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoramixError, match=f"cannot load embedding model .*{message}") as e:
        Encoder(str(folder))
    assert "\n" not in str(e.value)
