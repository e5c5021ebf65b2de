"""The catalogue of bad inputs (docs/errors.md): each gives exit status 1, one line on stderr naming the file,
entry or field and what is wrong, no traceback, and no output left behind."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import helpers
from helpers import make_bank, topic_records, write_adapter, write_jsonl
from safetensors.torch import load_file, save_file

from loramix.cli import main


def run_cli(args: list[str], capsys, monkeypatch) -> tuple[int, str]:
    """(exit code, stderr) of `loramix ARGS` run in this process."""
    code, _, err = helpers.run_cli(args, capsys, monkeypatch)
    return code, err


def _rewrite(folder: Path, **kw) -> None:
    """A new adapter in `folder` for the same base model, with write_adapter's options `kw`."""
    base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    write_adapter(folder, base=base, **kw)


def _edit_config(folder: Path, **fields) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder: Path, fn) -> None:
    f = folder / "adapter_model.safetensors"
    tensors = {k: t.clone() for k, t in load_file(f).items()}  # load_file maps the file it is about to rewrite
    save_file(fn(tensors), f)


def _set_first(tensors, value):
    k = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[k] = tensors[k].clone()
    tensors[k][0, 0] = value
    return tensors


E = "task_colors"  # the entry each bank case breaks
BANK_CASES = {
    "corrupted weights": (lambda b: (b / E / "adapter_model.safetensors").write_bytes(b"\x00garbage"), f"{E}: adapter_model.safetensors: unreadable"),
    "truncated weights": (lambda b: (b / E / "adapter_model.safetensors").write_bytes((b / E / "adapter_model.safetensors").read_bytes()[:-64]), f"{E}: adapter_model.safetensors"),
    "missing config": (lambda b: (b / E / "adapter_config.json").unlink(), f"{E}: no adapter_config.json"),
    "invalid config": (lambda b: (b / E / "adapter_config.json").write_text("{r: 4"), f"{E}: adapter_config.json: invalid JSON"),
    "config not an object": (lambda b: (b / E / "adapter_config.json").write_text("[1]"), f"{E}: adapter_config.json: expected a JSON object"),
    "other base model": (lambda b: _edit_config(b / E, base_model_name_or_path="other/model"), f"{E}: adapter_config.json field 'base_model_name_or_path'"),
    "shape mismatch": (lambda b: _rewrite(b / E, shapes={"model.layers.0.self_attn.q_proj": (64, 32)}), f"{E}: module 'model.layers.0.self_attn.q_proj' is \\[64, 32\\]"),
    "lora_A without lora_B": (lambda b: _edit_tensors(b / E, lambda t: {k: v for k, v in t.items() if not k.endswith("layers.1.self_attn.v_proj.lora_B.weight")}), f"{E}: adapter_model.safetensors: module 'model.layers.1.self_attn.v_proj' has no lora_B"),
    "NaN weights": (lambda b: _edit_tensors(b / E, lambda t: _set_first(t, float("nan"))), f"{E}: module '.*' has NaN or Inf weights"),
    "Inf weights": (lambda b: _edit_tensors(b / E, lambda t: _set_first(t, float("inf"))), f"{E}: module '.*' has NaN or Inf weights"),
    "rank 0": (lambda b: _rewrite(b / E, rank_pattern={"q_proj": 0}), f"{E}: .*'rank_pattern' must be an object of positive integers"),
    "rank disagrees with tensors": (lambda b: _edit_config(b / E, r=8), f"{E}: adapter_config.json: rank 8 for module"),
    "DoRA": (lambda b: _edit_config(b / E, use_dora=True), f"{E}: adapter_config.json: field 'use_dora' is set"),
    "LoRA bias": (lambda b: _edit_config(b / E, lora_bias=True), f"{E}: adapter_config.json: field 'lora_bias' is set"),
    "modules_to_save": (lambda b: _edit_config(b / E, modules_to_save=["lm_head"]), f"{E}: adapter_config.json: field 'modules_to_save' is set"),
    "unknown config field": (lambda b: _edit_config(b / E, some_future_field=1), f"{E}: adapter_config.json: field 'some_future_field' is set"),
    "bias training": (lambda b: _edit_config(b / E, bias="lora_only"), f"{E}: adapter_config.json: field 'bias' is 'lora_only'"),
    "not a LoRA": (lambda b: _edit_config(b / E, peft_type="IA3"), f"{E}: adapter_config.json: peft_type is 'IA3'"),
    "pickle adapter": (lambda b: ((b / E / "adapter_model.safetensors").rename(b / E / "adapter_model.bin")), f"{E}: adapter_model.bin is a pickle"),
    "non-adapter tensor": (lambda b: _edit_tensors(b / E, lambda t: {**t, "base_model.model.lm_head.weight": torch.zeros(2, 2)}), f"{E}: adapter_model.safetensors: tensor 'base_model.model.lm_head.weight' is not a LoRA"),
}
DATA_CASES = {
    "empty dataset": ("", "the dataset has no samples"),
    "no output field": ('{"input": "a"}\n', "task.jsonl:1: missing field 'output'"),
    "no input field": ('{"text": "a", "output": "b"}\n', "task.jsonl:1: missing field 'input'"),
    "invalid JSON line": ('{"input": "a", "output": "b"}\n{oops\n', "task.jsonl:2: invalid JSON"),
    "pathological line": (json.dumps({"input": "x" * 2_000_000, "output": "y"}) + "\n", "task.jsonl:1: the record is 2,000,001 characters long"),
    "output not a string": ('{"input": "a", "output": 5}\n', "task.jsonl:1: field 'output' must be a string or a non-empty list"),
}
OPTION_CASES = {
    "unknown signature": (["--signature", "nope"], "unknown signature 'nope'; choose one of"),
    "distance for another signature": (["--distance", "kl"], "distance 'kl' compares tokens signatures, not cloud"),
    "bad rank": (["--rank", "half"], "rank must be an integer or 'full'"),
    "zero top-k": (["--top-k", "0"], "top-k must be at least 1"),
    "zero temperature": (["--temperature", "0"], "temperature must be positive"),
    "paper with a rank": (["--compose", "paper", "--rank", "4"], "composition 'paper' keeps the entries' rank"),
}


def _assert_clean_failure(code: int, err: str, pattern: str, out: Path) -> None:
    import re

    assert code == 1, err
    lines = [x for x in err.strip().splitlines() if not x.startswith(("WARNING", " "))]  # warnings (wrapped) may come first
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("case", list(BANK_CASES))
def test_bad_bank(case, tmp_path, capsys, monkeypatch, tiny_base):
    """Through the default path (the held-out check runs the real tiny base on the bank's factors first)."""
    bank = make_bank(tmp_path / "bank", n=3, base=str(tiny_base))
    breaker, pattern = BANK_CASES[case]
    breaker(bank)
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("fruits", 6))
    out = tmp_path / "out"
    code, err = run_cli(["generate", "--bank", str(bank), "--data", str(data), "--out", str(out), "--max-samples", "4"], capsys, monkeypatch)
    _assert_clean_failure(code, err, pattern, out)


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data(case, tmp_path, capsys, monkeypatch):
    bank = make_bank(tmp_path / "bank", n=2)
    content, pattern = DATA_CASES[case]
    data = tmp_path / "task.jsonl"
    data.write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    code, err = run_cli(["generate", "--bank", str(bank), "--data", str(data), "--out", str(out)], capsys, monkeypatch)
    _assert_clean_failure(code, err, pattern, out)


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_bad_options(case, tmp_path, capsys, monkeypatch):
    bank = make_bank(tmp_path / "bank", n=2)
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("fruits", 6))
    args, pattern = OPTION_CASES[case]
    out = tmp_path / "out"
    code, err = run_cli(["generate", "--bank", str(bank), "--data", str(data), "--out", str(out), *args], capsys, monkeypatch)
    _assert_clean_failure(code, err, pattern, out)


def test_a_base_model_that_cannot_be_loaded_names_the_check(tmp_path, capsys, monkeypatch):
    """The default held-out check runs the base model: a bank whose base cannot be loaded says so in one line, before
    any signature is computed, and how to skip the check."""
    bank = make_bank(tmp_path / "bank", n=2)  # base 'tiny-base': not a model anyone can load
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("fruits", 6))
    out = tmp_path / "out"
    code, err = run_cli(["generate", "--bank", str(bank), "--data", str(data), "--out", str(out)], capsys, monkeypatch)
    _assert_clean_failure(code, err, r"cannot load base model 'tiny-base'.*\(--refine auto trains on the base model; "
                          r"--check 0 composes without it\)", out)
    assert not (bank / ".loramix").exists()  # no signature was computed


def test_other_files_and_paths(tmp_path, capsys, monkeypatch):
    bank = make_bank(tmp_path / "bank", n=2)
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("fruits", 6))
    (tmp_path / "latin1.jsonl").write_bytes('{"input": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    cases = [
        (["generate", "--bank", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "o")], "bank folder not found"),
        (["generate", "--bank", str(bank), "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")], "missing.jsonl: dataset not found"),
        (["generate", "--bank", str(bank), "--data", str(tmp_path / "latin1.jsonl"), "--out", str(tmp_path / "o")], "latin1.jsonl: not UTF-8"),
        (["generate", "--bank", str(bank), "--data", str(bank / "task_animals" / "adapter_config.json"), "--out", str(tmp_path / "o")], "expected a list of records"),
        (["bank", "add", str(bank), str(bank / "task_animals"), "--data", str(data), "--name", "../escape"], "'../escape' is not a valid bank entry name"),
        (["bank", "add", str(bank), str(bank / "task_animals"), "--data", str(data)], "task_animals, which this command reads"),
    ]
    for args, pattern in cases:
        code, err = run_cli(args, capsys, monkeypatch)
        _assert_clean_failure(code, err, pattern, tmp_path / "o")
    assert not (bank.parent / "escape").exists()


def test_existing_output_is_refused_then_only_loramix_files_replaced(tmp_path, capsys, monkeypatch):
    bank = make_bank(tmp_path / "bank", n=2)
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("fruits", 6))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "adapter_config.json").write_text("old")
    args = ["generate", "--bank", str(bank), "--data", str(data), "--out", str(out), "--max-samples", "4", "--check", "0"]
    code, err = run_cli(args, capsys, monkeypatch)
    assert code == 1 and "already exists (use --force to replace it)" in err
    code, err = run_cli(args[:-2], capsys, monkeypatch)  # refused before the base model is loaded for the check
    assert code == 1 and "already exists (use --force to replace it)" in err
    assert (out / "adapter_config.json").read_text() == "old"
    code, err = run_cli(args + ["--force"], capsys, monkeypatch)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    bank = make_bank(tmp_path / "bank", n=2)
    _edit_config(bank / "task_animals", use_dora=True)
    from loramix import LoramixError

    monkeypatch.setattr(sys, "argv", ["loramix", "--debug", "bank", "list", str(bank)])
    with pytest.raises(LoramixError):
        main()
    assert "LORAMIX_DEBUG" not in os.environ  # --debug is this invocation's, never the environment's


def test_settings_are_named_as_the_api_does_and_as_the_cli_does(tmp_path, caplog, capsys, monkeypatch, tiny_base):
    """One message, two interfaces: Python names GenerateConfig's fields (check_budget, refine=0), the CLI its
    options (--check-budget, --refine 0), in errors and in warnings alike; the CLI's naming ends with its command."""
    import logging

    from typer.testing import CliRunner

    from loramix import GenerateConfig, LoramixError
    from loramix.cli import app
    from loramix.errors import setting

    with pytest.raises(LoramixError, match=r"^check_budget must be a positive number of seconds"):
        GenerateConfig(check_budget=-1.0)
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 4))
    r = CliRunner().invoke(app, ["generate", "--bank", str(make_bank(tmp_path / "bank", n=2)), "--data", str(data),
                                 "--out", str(tmp_path / "out"), "--check-budget", "-1"])
    assert r.exit_code == 1 and r.exception.render(__import__("loramix.config").config.flag).startswith(
        "--check-budget must be")
    log = logging.getLogger("loramix")
    with caplog.at_level(logging.WARNING, logger="loramix"):
        log.warning("%s skips it", setting("refine", 0))
    assert caplog.records[-1].getMessage() == "refine=0 skips it"  # after a CLI command: the library's terms again
    code, err = run_cli(["generate", "--bank", str(make_bank(tmp_path / "bank2", n=2, base=str(tiny_base))), "--data",
                         str(data), "--out", str(tmp_path / "o2"), "--refine", "2", "--budget", "1e-12", "--check", "0"],
                        capsys, monkeypatch)
    assert code == 1 and "--refine 2 (--refine-method finetune" in err and "one step is more than --budget 1e-12" in err, err
