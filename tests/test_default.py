"""The embedded default: the SmolLM2 base converted from its GGUF, the committed suite and bank."""

import json
import os

import pytest

import loramix
from loramix.build import DEMO_TASKS, suite_tasks
from loramix.paths import DEFAULT_BANK, DEFAULT_SUITE
from loramix.train_config import BANK_TRAINING
from loramix.data import read_dataset


@pytest.mark.slow
def test_default_base_converts_from_the_gguf(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from loramix.runtime.pytorch import DEFAULT_BASE, default_base_path, load_tokenizer, resolve_base
    from loramix.prompts import prompt_ids

    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path))
    path = default_base_path()
    assert path == tmp_path / "models" / "SmolLM2-135M-Instruct" and (path / "model.safetensors").is_file()
    assert resolve_base("default") == resolve_base(DEFAULT_BASE) == resolve_base(None) == str(path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576 and "quantization_config" not in cfg
    tok = load_tokenizer(str(path))
    ids = prompt_ids(tok, "What is the capital of France?")
    assert tok.decode(ids).startswith("<|im_start|>system")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, len(ids):])


def test_suite_is_committed_with_splits_and_licences():
    index = json.loads((DEFAULT_SUITE / "suite.json").read_text())
    assert len(index) >= 40 and len({t["family"] for t in index}) >= 8
    assert sorted(t["name"] for t in index) == suite_tasks("default")
    for t in index:
        assert t["source"] and t["license"]
        assert all((DEFAULT_SUITE / t["name"] / f"{s}.jsonl").is_file() for s in ("train", "valid", "test"))


def test_default_bank_is_valid_and_small():
    bank = loramix.Bank("default")
    names = [e.name for e in bank.entries]
    assert len(names) >= 40 and names == [e.name for e in bank.usable]
    assert set(names) <= set(suite_tasks("default")) and not set(names) & set(DEMO_TASKS)  # demo tasks stay unseen
    assert bank.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and bank.max_rank == BANK_TRAINING.rank
    size = sum(f.stat().st_size for f in DEFAULT_BANK.rglob("*") if f.is_file() and ".loramix" not in f.parts)
    assert size <= 60 * 2**20
    for e in bank.entries:
        assert e.data_file.read_bytes() == (DEFAULT_SUITE / e.name / "train.jsonl").read_bytes()
        record = json.loads((e.adapter.path / "training.json").read_text())
        assert record["config"]["rank"] == BANK_TRAINING.rank and record["config"]["steps"] == BANK_TRAINING.steps


@pytest.mark.slow
@pytest.mark.parametrize("task,check", [(DEMO_TASKS[0], 16), (DEMO_TASKS[1], 0)])
def test_generate_from_default_bank_for_a_demo_task(tmp_path, task, check):
    """The nearest bank entry is of the task's family; with the default held-out check (the base model runs), the
    adapter written is the candidate the check kept, and its coefficients are that candidate's."""
    data = DEFAULT_SUITE / task / "train.jsonl"
    result = loramix.generate("default", data, tmp_path / "out", max_samples=32, check=check)
    family = task.split("_")[0]
    assert min(result.distances, key=result.distances.get).startswith(family)
    chk = result.report.check
    if check:
        assert chk.examples == 16 and chk.criterion == "rouge" and len(chk.candidates) == 1 + 4 + 4
        assert chk.candidates[chk.chosen]["rouge"] == max(v["rouge"] for v in chk.candidates.values())
        if chk.chosen.startswith("entry:"):
            assert result.coefficients[chk.chosen.split(":", 1)[1]] == 1.0 and sum(result.coefficients.values()) == 1.0
    else:
        assert chk is None and result.top(1)[0][0].startswith(family)
    assert read_dataset(data).fingerprint() == result.report.data.fingerprint
    assert os.path.getsize(tmp_path / "out" / "adapter_model.safetensors") > 0
