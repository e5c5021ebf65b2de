"""Regression tests of a hostile reliability pass over the command line: each one a failure found by feeding a command
inputs a careless or hostile user would (odd locales, path-like task names, tiny budgets, DatasetDict test data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
