"""Regression tests of a hostile reliability pass over the command line: each one a failure found by feeding a command
inputs a careless or hostile user would (odd locales, path-like task names, tiny budgets, DatasetDict test data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import make_bank, run_cli, topic_records, write_jsonl

from loramix.paths import DEFAULT_SUITE

LORAMIX = [sys.executable, "-c", "from loramix.cli import main; main()"]


def c_locale() -> dict[str, str]:
    """The environment of a C / POSIX locale without UTF-8 mode: stdout ASCII, file names and argv decoded as ASCII."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIOENCODING", "PYTHONUTF8"))}
    return {**env, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "LORAMIX_PROGRESS": "0"}


def test_non_ascii_text_on_an_ascii_terminal_is_escaped_not_a_crash(tmp_path):
    """`bank list` printing a base model name with 'ä' to an ASCII stdout (LC_ALL=C PYTHONUTF8=0) raised
    UnicodeEncodeError ('unexpected ... a loramix bug'); so did `generate --help` (its help holds '…')."""
    bank = make_bank(tmp_path / "bank", 2, base="owner/b\u00e4se")
    run = subprocess.run([*LORAMIX, "bank", "list", str(bank)], env=c_locale(), capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert b"owner/b\\xe4se" in run.stdout and b"unexpected" not in run.stderr
    run = subprocess.run([*LORAMIX, "generate", "--help"], env=c_locale(), capture_output=True, timeout=120)
    assert run.returncode == 0 and b"unexpected" not in run.stderr, run.stderr


def test_utf8_names_in_a_c_locale_are_not_called_non_utf8(tmp_path):
    """A bank entry named 'café' under LC_ALL=C PYTHONUTF8=0 was refused as 'not UTF-8 text (byte 0xc3); rename it',
    which is false: the name is UTF-8, this Python reads file names as ASCII. The refusal says so and how to run."""
    bank = make_bank(tmp_path / "bank", 2)
    (bank / "task_animals").rename(bank / "caf\u00e9")
    run = subprocess.run([*LORAMIX, "bank", "list", str(bank)], env=c_locale(), capture_output=True, timeout=120)
    lines = run.stderr.decode().strip().splitlines()
    assert run.returncode == 1 and len(lines) == 1, run.stderr
    assert "is UTF-8 text, but this Python reads file names as" in lines[0] and "PYTHONUTF8=1" in lines[0]
    assert "rename" not in lines[0]


def test_try_prompts_are_read_as_utf8_in_a_c_locale():
    """`try --prompt 'héllo'` (and a prompt typed on stdin) under LC_ALL=C PYTHONUTF8=0 was refused as 'the prompt is
    not UTF-8 text': argv and stdin are decoded as ASCII there. Their bytes are read as the UTF-8 they are."""
    from loramix.cli import _as_utf8

    assert _as_utf8("h\udcc3\udca9llo", "ascii") == "h\u00e9llo"
    assert _as_utf8("h\u00e9llo", "utf-8") == "h\u00e9llo"
    assert _as_utf8("h\udcffx", "ascii") == "h\udcffx"  # not UTF-8: left for prompt_ids to refuse


def test_bank_build_task_names_are_names_not_paths(tmp_path, tiny_base, capsys, monkeypatch):
    """`bank build --task ../outside` trained the folder beside the suite and wrote its entry beside OUT, outside
    the bank; an absolute --task wrote (replaced) that folder. A task is one folder name of the suite."""
    suite = tmp_path / "suite"
    write_jsonl((suite / "t1").mkdir(parents=True) or suite / "t1" / "train.jsonl", topic_records("animals", 8))
    write_jsonl((tmp_path / "outside").mkdir() or tmp_path / "outside" / "train.jsonl", topic_records("colors", 8))
    for task in ("../outside", str(tmp_path / "outside"), ".", "t1/"):
        code, out, err = run_cli(["bank", "build", "--suite", str(suite), "--task", task, "--out", str(tmp_path / "b" / "bank"),
                                  "--base", str(tiny_base), "--steps", "1"], capsys, monkeypatch)
        assert code == 1 and err.count("\n") == 1 and "is not a task name" in err, err
    assert not (tmp_path / "b").exists()
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["train.jsonl"]


def test_train_with_a_budget_shorter_than_one_step_runs_one(tmp_path, tiny_base, capsys, monkeypatch):
    """`train --budget 1e-9` ran no step, wrote an untrained adapter and then failed with 'unexpected
    ZeroDivisionError' (exit 1 after writing its output). Like --max-tokens, the budget keeps at least one step."""
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("animals", 8))
    code, out, err = run_cli(["train", "--data", str(data), "--out", str(tmp_path / "a"), "--base", str(tiny_base),
                              "--steps", "5", "--budget", "1e-9"], capsys, monkeypatch)
    assert code == 0, err
    assert "1 steps" in out
    assert len(json.loads((tmp_path / "a" / "training.json").read_text())["loss"]) == 1


def test_eval_of_a_dataset_dict_scores_its_test_split(tmp_path, tiny_base, capsys, monkeypatch):
    """`loramix eval --data DICT` (a save_to_disk DatasetDict) scored its train split, while evaluate(DICT) scores the
    test split: the command line silently evaluated on the training data."""
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(topic_records("animals", 6)),
                          "test": datasets.Dataset.from_list(topic_records("colors", 3))}).save_to_disk(str(tmp_path / "dd"))
    code, out, err = run_cli(["eval", "--data", str(tmp_path / "dd"), "--base", str(tiny_base), "--json",
                              "--max-new-tokens", "1"], capsys, monkeypatch)
    assert code == 0, err
    assert json.loads(out)["n"] == 3


def test_bank_add_refuses_nan_weights_before_writing(tmp_path, capsys, monkeypatch):
    """`bank add` (which refuses 'anything that would make the bank invalid') added an adapter with a NaN in its
    weights: LoraAdapter reads only the header, so every later generate on the bank failed on that entry instead."""
    import torch
    from safetensors.torch import load_file, save_file

    from helpers import write_adapter

    adapter = write_adapter(tmp_path / "nan_adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if "lora_A" in k)
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, adapter / "adapter_model.safetensors")
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("animals", 4))
    code, out, err = run_cli(["bank", "add", str(tmp_path / "bank"), str(adapter), "--data", str(data)], capsys, monkeypatch)
    assert code == 1 and err.count("\n") == 1 and "nan_adapter: module" in err and "has NaN or Inf weights" in err, err
    assert not (tmp_path / "bank").exists()


def test_bank_add_of_the_current_folder_is_named_after_it(tmp_path, capsys, monkeypatch):
    """`bank add BANK . --data D` from inside the adapter's folder was refused as "'' is not a valid bank entry
    name": the default name of '.' (or 'x/..') is the folder's own name."""
    from helpers import write_adapter

    adapter = write_adapter(tmp_path / "my_lora")
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("animals", 4))
    monkeypatch.chdir(adapter)
    code, out, err = run_cli(["bank", "add", str(tmp_path / "bank"), ".", "--data", str(data)], capsys, monkeypatch)
    assert code == 0, err
    assert (tmp_path / "bank" / "my_lora" / "adapter_config.json").is_file()


def test_an_output_with_a_long_but_valid_name_is_written(tmp_path, capsys, monkeypatch):
    """`generate --out <240 characters>` (a valid name: at most 255 bytes) was refused as 'File name too long'
    naming a hidden temporary file the user never asked for; so were export gguf and eval --predictions. Their
    temporary names now carry a short stem of the name, and a dead run's leftovers under it are still cleared."""
    from loramix.files import atomic_dir, clear_leftovers, hidden_stem

    bank = make_bank(tmp_path / "bank", 2)
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("animals", 6))
    name = "a" * 240
    for _ in range(2):  # written, then replaced
        code, out, err = run_cli(["generate", "--bank", str(bank), "--data", str(data), "--out", str(tmp_path / name),
                                  "--check", "0", "--force"], capsys, monkeypatch)
        assert code == 0, err
    assert (tmp_path / name / "adapter_config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # a run killed between moving the old output aside and renaming the new one in: the next run puts it back
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    long = "é" * 120  # 240 bytes
    old = tmp_path / f".{hidden_stem(long)}.{dead}-x1.old"
    (old / long).mkdir(parents=True)
    (old / long / "kept.txt").write_text("mine")
    assert clear_leftovers(tmp_path, long) == [old.name]
    assert (tmp_path / long / "kept.txt").read_text() == "mine"
    with atomic_dir(tmp_path / long, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / long).iterdir()) == ["kept.txt", "new.txt"]


def test_bank_index_takes_a_tokens_signature_with_or_without_its_distance(tmp_path, tiny_base, capsys, monkeypatch):
    """`bank index BANK --signature unigram` was refused with "distance 'gaussian-w2' compares cloud signatures"
    though it computes no distance, and so was `--signature unigram --distance kl`: the default distance was checked
    against the signature before --distance was applied, so no tokens signature could be indexed."""
    bank = make_bank(tmp_path / "bank", 3, base=str(tiny_base))
    code, out, err = run_cli(["bank", "index", str(bank), "--signature", "unigram"], capsys, monkeypatch)
    assert code == 0, err
    assert "3 signatures (unigram)" in out
    code, out, err = run_cli(["bank", "index", str(bank), "--signature", "unigram", "--distance", "kl"], capsys, monkeypatch)
    assert code == 0, err
    assert "distance matrix (kl): 3 x 3" in out
    code, out, err = run_cli(["bank", "index", str(bank), "--distance", "kl"], capsys, monkeypatch)
    assert code == 1 and "distance 'kl' compares tokens signatures, not cloud" in err


def test_force_over_another_adapter_keeps_no_stale_report(tmp_path, tiny_base, capsys, monkeypatch):
    """`train --out X --force` over an adapter `generate` wrote kept X/loramix.json (carried over as 'anything else in
    the folder'): read_report(X) then described the trained adapter as a composition, with coefficients. Likewise a
    generate over a trained adapter kept its training.json. The user's own files are still kept."""
    from loramix.report import read_report

    bank = make_bank(tmp_path / "bank", 2, base=str(tiny_base))
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("animals", 6))
    out = tmp_path / "out"
    assert run_cli(["generate", "--bank", str(bank), "--data", str(data), "--out", str(out), "--check", "0"], capsys, monkeypatch)[0] == 0
    read_report(out)
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(["train", "--data", str(data), "--out", str(out), "--base", str(tiny_base), "--steps", "1", "--force"],
                           capsys, monkeypatch)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt", "training.json"]
    code, _, err = run_cli(["generate", "--bank", str(bank), "--data", str(data), "--out", str(out), "--check", "0", "--force"],
                           capsys, monkeypatch)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "loramix.json", "notes.txt"]


def test_eval_and_try_read_a_pickled_adapter_only_with_allow_pickle(tmp_path, tiny_base, capsys, monkeypatch):
    """`eval` / `try` on an adapter whose weights are only adapter_model.bin loaded the pickle through PEFT without
    --allow-pickle (every other reader refuses it), and a pickle holding more than tensors ended in 'unexpected
    UnpicklingError (a loramix bug)' after a multi-line warning. Both are one-line refusals now; --allow-pickle reads
    plain tensors."""
    import os
    import pickle

    import torch
    from safetensors.torch import load_file

    from helpers import write_adapter

    adapter = write_adapter(tmp_path / "pickled", base=str(tiny_base))
    torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    data = write_jsonl(tmp_path / "t.jsonl", topic_records("animals", 2))
    args = ["eval", "--data", str(data), "--adapter", str(adapter), "--max-new-tokens", "1", "--json"]
    code, out, err = run_cli(args, capsys, monkeypatch)
    assert code == 1 and err.count("\n") == 1 and "pickled: adapter_model.bin is a pickle and is not loaded by default" in err, err
    code, out, err = run_cli([*args, "--allow-pickle"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["n"] == 2, err

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"x": Evil()}))
    for cmd in (args, ["try", "--adapter", str(adapter), "-p", "cat"]):
        code, out, err = run_cli([*cmd, "--allow-pickle"], capsys, monkeypatch)
        assert code == 1 and err.count("\n") == 1 and "adapter_model.bin: not loadable as plain tensors" in err, err
    assert not (tmp_path / "pwned").exists()


def test_an_output_under_a_file_is_refused_before_any_work(tmp_path, tiny_base, capsys, monkeypatch):
    """`train --out FILE/x` trained to the end and then failed with 'File exists: FILE' (mkdir's word for a parent
    that is a file); eval --predictions FILE/p.jsonl likewise after generating every answer. Refused first, naming
    the file in the way."""
    from helpers import write_adapter

    data = write_jsonl(tmp_path / "d.jsonl", topic_records("animals", 4))
    (tmp_path / "afile").write_text("x")
    for args in (["train", "--data", str(data), "--base", str(tiny_base), "--steps", "1", "--out", str(tmp_path / "afile" / "x")],
                 ["eval", "--data", str(data), "--base", str(tiny_base), "--predictions", str(tmp_path / "afile" / "p.jsonl")],
                 ["bank", "add", str(tmp_path / "afile" / "b"), str(write_adapter(tmp_path / "ad")), "--data", str(data)]):
        code, out, err = run_cli(args, capsys, monkeypatch)
        assert code == 1 and err.count("\n") == 1, err
        assert f"{tmp_path / 'afile'} is a file, not a folder, so nothing can be written inside it" in err, err
    assert (tmp_path / "afile").read_text() == "x"


def test_a_scale_too_large_for_the_composition_is_one_line(tmp_path, capsys, monkeypatch):
    """A finite but huge --scale overflows the composed update: one line naming the module, nothing written."""
    data = DEFAULT_SUITE / "numbers_roman" / "train.jsonl"
    code, _, err = run_cli(["generate", "--bank", "default", "--data", str(data), "--out", str(tmp_path / "o"),
                            "--scale", "1e308", "--check", "0"], capsys, monkeypatch)
    assert code == 1 and err.count("\n") == 1 and "overflows float64" in err, err
    assert not (tmp_path / "o").exists()


def test_tasks_build_refuses_a_bank_as_its_output(tmp_path, capsys, monkeypatch):
    """`tasks build --out BANK` would mix task folders into a bank: refused in one line, the bank unchanged."""
    bank = make_bank(tmp_path / "bank", n=2)
    before = sorted(p.name for p in bank.iterdir())
    code, _, err = run_cli(["tasks", "build", "--out", str(bank), "--only", "numbers_roman"], capsys, monkeypatch)
    assert code == 1 and err.count("\n") == 1 and "is a bank" in err, err
    assert sorted(p.name for p in bank.iterdir()) == before


# -- a third hostile pass over the command line ----------------------------------------------------------------------

def _huge_array_gguf(path):
    """51 bytes of GGUF header declaring one key whose array holds 2**60 uint32 values."""
    import struct

    kv = struct.pack("<Q", 3) + b"abc" + struct.pack("<I", 9) + struct.pack("<I", 4) + struct.pack("<Q", 2**60)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv)
    return path


def test_a_gguf_header_that_declares_more_than_its_file_is_refused_at_once(tmp_path, capsys, monkeypatch):
    """A 51-byte GGUF declaring an array of 2**60 items as --base hung `eval` and `generate` on llama.cpp (gguf's
    reader walked the array: gigabytes of memory, killed at 150 s); a truncated GGUF on PyTorch gave a struct error."""
    import time

    from loramix.errors import LoramixError
    from loramix.runtime import check_base_gguf, default_gguf

    huge = _huge_array_gguf(tmp_path / "huge.gguf")
    start = time.monotonic()
    with pytest.raises(LoramixError, match="not a readable GGUF file.*runs past the end of the file"):
        check_base_gguf(huge)
    data = write_jsonl(tmp_path / "t.jsonl", topic_records("animals", 2))
    for runtime in ("llama.cpp", "torch"):
        code, _, err = run_cli(["eval", "--data", str(data), "--base", str(huge), "--runtime", runtime, "--limit", "1"],
                               capsys, monkeypatch)
        assert code == 1 and err.count("\n") == 1 and "not a readable GGUF file" in err, err
    assert time.monotonic() - start < 30
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(default_gguf().read_bytes()[:1_000_000])
    with pytest.raises(LoramixError, match="not a readable GGUF file"):
        check_base_gguf(truncated)
    whole = tmp_path / "whole.gguf"
    whole.write_bytes(default_gguf().read_bytes()[:-1])  # the header whole, the last tensor one byte short
    with pytest.raises(LoramixError, match="tensors' data ends at byte"):
        check_base_gguf(whole)
    check_base_gguf(default_gguf())


def test_a_gguf_lora_as_base_is_named_so_on_pytorch_too(tmp_path, tiny_base, capsys, monkeypatch):
    """On PyTorch (export gguf, export merged, train, eval --runtime torch) a GGUF LoRA given as --base was blamed on
    an invented [4096, 4096] shape, 291 missing weights or a tokenizer 'None'."""
    from loramix.export import export_gguf

    bank = make_bank(tmp_path / "bank", n=1, base=str(tiny_base))
    lora = export_gguf(bank / "task_animals", tmp_path / "lora.gguf", base=str(tiny_base))
    data = write_jsonl(tmp_path / "t.jsonl", topic_records("animals", 4))
    for args in (["export", "merged", "--adapter", str(bank / "task_animals"), "--out", str(tmp_path / "m")],
                 ["train", "--data", str(data), "--out", str(tmp_path / "t"), "--steps", "1"],
                 ["eval", "--data", str(data), "--runtime", "torch", "--limit", "1"]):
        code, _, err = run_cli([*args, "--base", str(lora)], capsys, monkeypatch)
        assert code == 1 and err.count("\n") == 1 and "is a GGUF adapter (lora), not a base model" in err, (args, err)
    assert not (tmp_path / "m").exists() and not (tmp_path / "t").exists()


def test_empty_and_non_utf8_paths_on_the_command_line_are_refused(tmp_path, tiny_base, capsys, monkeypatch):
    """`--out ""` (an unset shell variable) was the current folder: `bank loo BANK --out ""` wrote its adapters there
    and `bank add "" ADAPTER` made it a bank; a --out or --adapter that is not UTF-8 crashed train, eval, try and
    export merged with 'unexpected SafetensorError (a loramix bug)'."""
    bank = make_bank(tmp_path / "bank", n=3, base=str(tiny_base))
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("animals", 8))
    monkeypatch.chdir((tmp_path / "here").mkdir() or tmp_path / "here")
    for args, name in ((["bank", "loo", str(bank), "--out", ""], "--out"),
                       (["bank", "add", "", str(bank / "task_animals")], "BANK"),
                       (["generate", "--bank", "", "--data", str(data), "--out", "x"], "--bank"),
                       (["eval", "--data", str(data), "--adapter", " "], "--adapter")):
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 1 and err.strip() == f"error: {name}: an empty path (an unset shell variable?)", (args, err)
    bad = str(tmp_path / "out") + "\udcfe"  # the byte 0xfe of a name, as Python decodes argv
    for args in (["train", "--data", str(data), "--base", str(tiny_base), "--out", bad, "--steps", "1"],
                 ["export", "merged", "--adapter", bad, "--out", str(tmp_path / "m")]):
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 1 and err.count("\n") == 1 and "the path is not UTF-8 text (byte 0xfe); rename it" in err, err
    assert list((tmp_path / "here").iterdir()) == []


def test_train_names_a_target_module_peft_cannot_adapt_in_one_readable_line(tmp_path, tiny_base, capsys, monkeypatch):
    """`train --target-modules mlp` said only 'Target module LlamaMLP(' (the first line of PEFT's module repr)."""
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("animals", 8))
    code, _, err = run_cli(["train", "--data", str(data), "--base", str(tiny_base), "--out", str(tmp_path / "a"),
                            "--steps", "1", "--target-modules", "mlp"], capsys, monkeypatch)
    assert code == 1 and err.count("\n") == 1 and "Target module LlamaMLP is not supported" in err, err


def test_the_check_estimate_counts_scoring_many_references():
    """`--check auto` ran 5 min 50 s against a 120 s budget on records of 2000 references each: ROUGE-L against every
    reference was not in the estimate."""
    from loramix.data import Sample
    from loramix.runtime import scoring_seconds

    few = [Sample(f"give me fruits {i}", ("apple pear fig " * 8,)) for i in range(4)]
    many = [Sample(s.input, s.outputs * 2000) for s in few]
    assert scoring_seconds(many) > 300 * scoring_seconds(few) > 0  # the model's part: test_llamacpp's plan tests


def test_environment_switches_and_a_dangling_home(tmp_path, monkeypatch):
    """LORAMIX_PROGRESS=off / False turned progress bars on; a LORAMIX_HOME that is a dangling link said 'File
    exists'."""
    from loramix import progress
    from loramix.errors import LoramixError
    from loramix.paths import loramix_home

    for value, on in (("off", False), ("False", False), ("NO", False), ("", False), ("On", True), ("1", True)):
        monkeypatch.setenv("LORAMIX_PROGRESS", value)
        assert progress.enabled() is on, value
    (tmp_path / "home").symlink_to(tmp_path / "nowhere")
    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path / "home"))
    with pytest.raises(LoramixError, match="is a link to .*nowhere, which does not exist"):
        loramix_home()


def test_stdout_that_cannot_be_written_is_named(tmp_path, tiny_base):
    """`generate ... > /dev/full` wrote the adapter, then failed with 'No space left on device' naming nothing."""
    bank = make_bank(tmp_path / "bank", n=3, base=str(tiny_base))
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("animals", 8))
    with open("/dev/full", "w") as full:
        run = subprocess.run([*LORAMIX, "generate", "--bank", str(bank), "--data", str(data), "--out", str(tmp_path / "o"),
                              "--check", "0"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=300,
                             env={**os.environ, "LORAMIX_PROGRESS": "0", "LORAMIX_HOME": str(tmp_path / "home")})
    assert run.returncode == 1 and "standard output" in run.stderr and "unexpected" not in run.stderr, run.stderr
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()


def test_bank_readers_skip_pycache_and_refuse_a_config_peft_cannot_read(tmp_path):
    """A __pycache__ folder in a bank's root made every command refuse the bank; an adapter_config.json opening with
    a UTF-8 byte-order mark was composed, though PEFT cannot load it."""
    import loramix
    from loramix.errors import LoramixError

    root = make_bank(tmp_path / "bank", n=2)
    (root / "__pycache__").mkdir()
    assert [e.name for e in loramix.Bank(root).entries] == ["task_animals", "task_colors"]
    config = root / "task_colors" / "adapter_config.json"
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
    with pytest.raises(LoramixError, match="task_colors: adapter_config.json begins with a UTF-8 byte-order mark"):
        loramix.Bank(root)


def test_a_damaged_default_base_names_its_folder_and_the_fix(tmp_path, monkeypatch):
    """A damaged converted default base in LORAMIX_HOME/models failed every later run with 'cannot load base model
    None: SafetensorError', naming neither the folder nor how to convert it again."""
    from loramix.errors import LoramixError
    from loramix.runtime import default_base_folder
    from loramix.runtime.pytorch import load_model

    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path / "home"))
    folder = default_base_folder()
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(LoramixError, match=f"converted once to {folder}; remove that folder and it is converted again"):
        load_model(None)


def test_try_with_standard_input_closed_ends_quietly(tmp_path, tiny_base):
    """`loramix try --adapter A <&-` failed with 'unexpected RuntimeError: input(): lost sys.stdin'."""
    bank = make_bank(tmp_path / "bank", n=1, base=str(tiny_base))
    command = " ".join([sys.executable, "-c", "'from loramix.cli import main; main()'", "try", "--adapter",
                        str(bank / "task_animals"), "--base", str(tiny_base), "--max-new-tokens", "2", "<&-"])
    run = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LORAMIX_PROGRESS": "0", "LORAMIX_HOME": str(tmp_path / "home")})
    assert run.returncode == 0 and "unexpected" not in run.stderr, run.stderr
