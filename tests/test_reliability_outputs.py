"""Reliability, second pass (issue 37), classes 2, 4, 5, 6 and 12: cache keys that identify content, merges that
change nothing but the adapter, damaged base models, user text kept from rich markup and chat templates bounded,
and reruns that give the same bytes under any hash seed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import make_bank, run_cli, topic_records, write_adapter, write_jsonl

from loramix import Bank, BankIndex
from loramix.data import Dataset, Sample
from loramix.errors import LoramixError
from loramix.probes import ProbeSet


def one_line_error(code: int, err: str, pattern: str) -> str:
    import re

    assert code == 1, err
    lines = [x for x in err.strip().splitlines() if not x.startswith(("WARNING", " "))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert "a loramix bug" not in lines[0] and re.search(pattern, lines[0]), (pattern, lines[0])
    return lines[0]


# -- class 2: cache keys --------------------------------------------------------------------------------------

def _twin_entries(root: Path) -> Path:
    """A bank of two entries without data whose files have equal sizes and modification times (as a tar extraction
    leaves them) but different weights."""
    for i in range(2):
        write_adapter(root / f"entry0{i}", seed=i)
    for p in root.rglob("adapter_*"):
        os.utime(p, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    return root


def _fake_answers(calls: list[str]):
    """An answerer whose answer names the adapter's weights (a digest of their bytes)."""
    def answer(model, tokenizer, bank, entry, prompts):
        calls.append(entry.name)
        tag = hashlib.sha256((entry.adapter.path / "adapter_model.safetensors").read_bytes()).hexdigest()[:8]
        return Dataset([Sample(p, (f"answer {tag}",)) for p in prompts], entry.name)
    return answer


def test_probe_answers_are_keyed_by_content_not_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path / "home"))
    root = _twin_entries(tmp_path / "bank")
    a, b = (root / "entry00" / "adapter_model.safetensors"), (root / "entry01" / "adapter_model.safetensors")
    assert a.stat().st_size == b.stat().st_size and a.stat().st_mtime_ns == b.stat().st_mtime_ns
    assert a.read_bytes() != b.read_bytes()
    probes = ProbeSet(str(write_jsonl(tmp_path / "probes.jsonl", topic_records("fruits", 3))))
    calls: list[str] = []
    monkeypatch.setattr("loramix.probes.answer_probes", _fake_answers(calls))

    first = BankIndex(Bank(root)).probe_datasets(probes, model=object(), tokenizer=None)
    answers = [d.samples[0].output for d in first]
    assert answers[0] != answers[1] and sorted(calls) == ["entry00", "entry01"]
    assert len(list((root / ".loramix" / "probes").rglob("*.json"))) == 2  # two cache entries, not one

    # the bank copied with preserved times (cp -p, tar), the two entries' files swapped: each entry must read the
    # answers of its own bytes (cached under them), not those of the entry that had its name, size and mtime
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy2(root / "entry01" / name, copy / "entry00" / name)
        shutil.copy2(root / "entry00" / name, copy / "entry01" / name)
    calls.clear()
    again = BankIndex(Bank(copy)).probe_datasets(probes, model=object(), tokenizer=None)
    assert [d.samples[0].output for d in again] == answers[::-1]
    assert calls == []  # both read from the cache, each under its content


def test_adapter_hash_and_content_hash(tmp_path, monkeypatch):
    from loramix import store

    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path / "home"))
    root = _twin_entries(tmp_path / "bank")
    assert store.adapter_hash(root / "entry00") != store.adapter_hash(root / "entry01")
    # memoised by identity (path, inode, size, mtime, ctime): a rewrite of the same size with its mtime restored is
    # still seen (ctime), even when the memo is trusted at once
    monkeypatch.setattr(store, "_RACY_NS", -(10**19))
    monkeypatch.setattr(store, "_HASHES", {})
    f = tmp_path / "f.bin"
    f.write_bytes(b"a" * 64)
    os.utime(f, ns=(10**18, 10**18))
    assert store.content_hash(f) == hashlib.sha256(b"a" * 64).hexdigest()
    assert list((tmp_path / "home" / "hashes").glob("*/*.json"))  # kept across runs, under the index key's HMAC
    time.sleep(0.05)
    f.write_bytes(b"b" * 64)
    os.utime(f, ns=(10**18, 10**18))
    assert store.content_hash(f) == hashlib.sha256(b"b" * 64).hexdigest()
    monkeypatch.setattr(store, "_HASHES", {})  # a new process: the stored memo answers, for this version only
    assert store.content_hash(f) == hashlib.sha256(b"b" * 64).hexdigest()


def test_calibration_and_gguf_keys_follow_content(tmp_path, monkeypatch):
    from loramix.calibrate import _key, grid
    from loramix.config import GenerateConfig
    from loramix.runtime import gguf_identity

    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path / "home"))
    root = make_bank(tmp_path / "bank", n=3)
    config = GenerateConfig()
    before = _key(BankIndex(Bank(root)), config, grid())
    target = root / "task_animals" / "adapter_model.safetensors"
    st = target.stat()
    write_adapter(root / "task_animals", seed=99)  # other weights, same size, same mtime
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size
    assert _key(BankIndex(Bank(root)), config, grid()) != before
    g1, g2 = tmp_path / "a" / "base.gguf", tmp_path / "b" / "base.gguf"  # one name, one size, other bytes
    for g, byte in ((g1, b"x"), (g2, b"y")):
        g.parent.mkdir()
        g.write_bytes(byte * 128)
    assert gguf_identity(g1) != gguf_identity(g2)


# -- class 4: merges -----------------------------------------------------------------------------------------

def test_export_merged_with_tied_embeddings_is_base_plus_adapter(tmp_path, tiny_base):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from loramix.export import export_merged

    base = tmp_path / "tied"
    cfg = LlamaConfig.from_pretrained(tiny_base)
    cfg.tie_word_embeddings = True
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(base)
    for f in tiny_base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, base / f.name)
    model = AutoModelForCausalLM.from_pretrained(base)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    export_merged(tmp_path / "adapter", tmp_path / "merged", base=str(base))

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    plain = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        want, got = reference(ids).logits, merged(ids).logits
        assert (want - plain(ids).logits).abs().max() > 1e-2  # the adapter changes the logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert torch.equal(merged.model.embed_tokens.weight, plain.model.embed_tokens.weight)  # inputs untouched


# -- class 5: damaged base models ----------------------------------------------------------------------------

def _damaged(tiny_base: Path, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_base, folder)
    return folder


def test_base_whose_config_declares_more_layers_is_refused(tmp_path, tiny_base):
    from loramix.runtime.pytorch import load_model

    folder = _damaged(tiny_base, tmp_path, "more-layers")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoramixError, match=rf"base model '{folder}': its checkpoint lacks \d+ weight.*model\.layers\.2\."):
        load_model(str(folder))


@pytest.mark.parametrize("damage", ["weights", "weights-garbage", "tokenizer", "config-type"])
def test_damaged_base_files_are_one_line_naming_the_base(tmp_path, tiny_base, damage, capsys, monkeypatch):
    folder = _damaged(tiny_base, tmp_path, f"damaged-{damage}")
    if damage == "weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "weights-garbage":
        (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!}" + b"\0" * 64)
    elif damage == "tokenizer":
        (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    else:
        config = json.loads((folder / "config.json").read_text())
        config["hidden_size"] = "thirty-two"
        (folder / "config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "test.jsonl", topic_records("fruits", 3))
    code, _, err = run_cli(["eval", "--data", str(data), "--base", str(folder), "--max-new-tokens", "2"], capsys,
                           monkeypatch)
    one_line_error(code, err, rf"cannot load (the tokenizer of )?base model '{folder}'|base model '{folder}'")


# -- class 6: markup and templates ---------------------------------------------------------------------------

def test_paths_with_markup_are_printed_not_interpreted(tmp_path, capsys, monkeypatch):
    bank = make_bank(tmp_path / "bank", n=3)
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 8))
    out = tmp_path / "o" / "run[/]x"
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli(["generate", "--bank", str(bank), "--data", str(data), "--out", str(out), "--check", "0",
                                 "--max-samples", "8"], capsys, monkeypatch)
    assert code == 0, err
    assert (out / "adapter_model.safetensors").is_file() and "run[/]x" in stdout
    code, _, err = run_cli(["generate", "--bank", str(bank), "--data", str(tmp_path / "[bold]no[/]"), "--out",
                            str(tmp_path / "x[/red]"), "--check", "0"], capsys, monkeypatch)
    assert "[bold]no[/]" in one_line_error(code, err, r"\[bold\]no\[/\]")


def test_try_prompt_with_chat_markup(tmp_path, tiny_base, capsys, monkeypatch):
    adapter = write_adapter(tmp_path / "adapter", base=str(tiny_base))
    code, stdout, err = run_cli(["try", "--adapter", str(adapter), "--base", str(tiny_base), "--max-new-tokens", "2",
                                 "-p", "give me [/INST] some [bold]fruits[/] words"], capsys, monkeypatch)
    assert code == 0, err
    assert "> give me [/INST] some [bold]fruits[/] words" in stdout and "adapter:" in stdout


class _Tok:
    """A tokenizer stand-in that renders its chat template as transformers does (sandboxed Jinja)."""

    def __init__(self, template: str):
        self.chat_template = template
        self.name_or_path = "some/base"
        self.bos_token_id = 1

    def apply_chat_template(self, messages, **kw):
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template([messages], chat_template=self.chat_template, add_generation_prompt=True)
        return [len(rendered[0])]


def test_chat_template_errors_are_one_line_naming_the_base():
    from loramix.prompts import prompt_ids

    with pytest.raises(LoramixError, match=r"base model 'some/base': its chat template fails .*no system role"):
        prompt_ids(_Tok("{{ raise_exception('no system role') }}"), "hi")
    with pytest.raises(LoramixError, match=r"base model 'some/base': its chat template fails"):
        prompt_ids(_Tok("{% for m in messages %}{{ m.content.nope() }}{% endfor %}"), "hi")
    assert prompt_ids(_Tok("{% for m in messages %}{{ m.content }}{% endfor %}"), "hello") == [5]


def test_chat_template_that_loops_is_stopped(monkeypatch):
    from loramix import prompts

    monkeypatch.setattr(prompts, "TEMPLATE_SECONDS", 0.5)
    loop = "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}{% endfor %}{% endfor %}{% endfor %}"
    start = time.monotonic()
    with pytest.raises(LoramixError, match=r"base model 'some/base': its chat template took more than 0.5 s"):
        prompts.prompt_ids(_Tok(loop), "hi")
    assert time.monotonic() - start < 5
    deadline = time.monotonic() + 5
    while any(t.name == "loramix-chat-template" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "loramix-chat-template" for t in threading.enumerate())  # stopped, not left spinning


# -- class 12: reruns ----------------------------------------------------------------------------------------

RERUN = r"""
import sys, torch
from pathlib import Path
from loramix import generate
from loramix.export import export_gguf, export_merged
from loramix.train import train
from loramix.train_config import TrainConfig
torch.set_num_threads(1)
bank, mixed, data, base, out = sys.argv[1:6]
out = Path(out)
generate(bank, data, out / "default", max_samples=8)  # the default: --check auto on the base
generate(bank, data, out / "finetune", max_samples=8, refine=4, refine_method="finetune", refine_steps=2)
generate(bank, data, out / "search", max_samples=8, refine=4, refine_method="gradient", refine_steps=2)
generate(bank, data, out / "nevergrad", max_samples=8, refine=4, refine_method="nevergrad", refine_steps=4)
generate(bank, data, out / "check-loss", max_samples=8, check=4, check_criterion="loss", check_tops=3)
generate(mixed, data, out / "mixed", max_samples=8, check=0)  # two entries signed by their probe answers
generate(mixed, data, out / "probes", max_samples=8, check=0, entry_signatures="probes")  # every entry by its answers
train(data, out / "train", TrainConfig(steps=3, batch_size=2, rank=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), base=base)
export_merged(out / "train", out / "merged", base=base)
export_gguf(out / "default", out / "default.gguf", base=base)
"""


def test_reruns_are_byte_identical_under_any_hash_seed(tmp_path, tiny_base):
    bank = make_bank(tmp_path / "bank", n=4, base=str(tiny_base))
    mixed = make_bank(tmp_path / "mixed", n=4, base=str(tiny_base), mixed=True)
    for name in ("task_animals", "task_colors"):
        (mixed / name / "train.jsonl").unlink()
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 16))
    procs = {}
    for seed in ("1", "2"):  # side by side, one thread each
        env = {**os.environ, "PYTHONHASHSEED": seed, "LORAMIX_PROGRESS": "0", "OMP_NUM_THREADS": "1",
               "LORAMIX_HOME": str(tmp_path / "home")}
        procs[seed] = subprocess.Popen([sys.executable, "-c", RERUN, str(bank), str(mixed), str(data), str(tiny_base),
                                        str(tmp_path / f"run{seed}")], env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    runs = []
    for seed, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out = tmp_path / f"run{seed}"
        runs.append({str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()})
    assert runs[0].keys() == runs[1].keys()
    assert {"default/loramix.json", "finetune/adapter_config.json", "train/training.json", "merged/model.safetensors",
            "search/loramix.json", "default.gguf", "nevergrad/loramix.json", "check-loss/loramix.json",
            "mixed/adapter_model.safetensors", "probes/loramix.json"} <= runs[0].keys()
    different = [name for name in runs[0] if runs[0][name] != runs[1][name]]
    assert different == []
    config = json.loads(runs[0]["train/adapter_config.json"])
    assert config["target_modules"] == sorted(config["target_modules"])
    assert "seconds" not in json.loads(runs[0]["train/training.json"])
    report = json.loads(runs[0]["finetune/loramix.json"])
    assert "seconds" not in report["finetune"] and "seconds" not in json.loads(runs[0]["search/loramix.json"])["refine"]
