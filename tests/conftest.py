"""Fixtures: a tiny model and banks built inside the tests (no downloads); the helpers are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Property tests draw the same cases on every run (make test must not depend on luck or on a .hypothesis/ folder
# left by an earlier run); LORAMIX_FUZZ_RANDOM=1 draws new ones, to explore.
settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", database=None)
settings.load_profile("explore" if os.environ.get("LORAMIX_FUZZ_RANDOM") else "repeatable")

os.environ.setdefault("LORAMIX_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers import WORDS, make_bank  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Llama with a word-level tokenizer, saved like a hub model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-base")
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture
def bank(tmp_path) -> Path:
    return make_bank(tmp_path / "bank")


@pytest.fixture
def mixed_bank(tmp_path, tiny_base) -> Path:
    return make_bank(tmp_path / "bank", base=str(tiny_base), mixed=True)
