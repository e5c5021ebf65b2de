"""Reliability, second pass (issue 37), classes 3, 7 and 13: no command writes over or inside what it reads; a bank
write killed or raced leaves nothing that blocks the next; what is printed of user and bank text is shown, never
obeyed by the terminal; a bank path is judged as a path; an init adapter of another base is refused."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_bank, run_cli, topic_records, write_adapter, write_jsonl

from loramix.errors import LoramixError

CLI = [sys.executable, "-c", "from loramix.cli import main; main()"]


def one_line(code: int, err: str, *needles: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "Traceback" not in err and "a loramix bug" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` with its content hash (folders: 'dir'; links: their target): what 'nothing changed on
    disk' compares."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# -- class 3: outputs that overwrite inputs ----------------------------------------------------------------------

@pytest.fixture
def world(tmp_path, tiny_base, monkeypatch):
    """Every input a command reads, each in a folder of its own (so that a folder can hold exactly one input), all
    under tmp_path with LORAMIX_HOME and the hub cache: a refused command must leave the whole tree unchanged."""
    import huggingface_hub.constants

    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()
    base = tmp_path / "base"
    import shutil

    shutil.copytree(tiny_base, base)
    bank = make_bank(tmp_path / "bank", n=2, base=str(base))  # generate and loo read the bank's own base
    data = write_jsonl((tmp_path / "data").mkdir() or tmp_path / "data" / "d.jsonl", topic_records("fruits", 6))
    probes = write_jsonl((tmp_path / "probes").mkdir() or tmp_path / "probes" / "p.jsonl", topic_records("tools", 4))
    adapter = write_adapter(tmp_path / "adapter" / "ad", base=str(base), seed=5)  # eval and export read its base
    suite = tmp_path / "suite"
    write_jsonl((suite / "t_colors").mkdir(parents=True) or suite / "t_colors" / "train.jsonl", topic_records("colors", 4))
    return {"bank": bank, "data": data, "probes": probes, "base": base, "adapter": adapter, "suite": suite,
            "hub cache": tmp_path / "hub", "root": tmp_path}


# Every command that writes a path the user names: (its arguments, the output's placeholder, folder or file, and
# the inputs it reads, by their key in `world`). OUT is replaced by the output tried; --force where it exists, so
# that only the rule under test can refuse.
WRITERS = {
    "generate": (["generate", "--bank", "{bank}", "--data", "{data}", "--probes", "{probes}", "--check", "0",
                  "--out", "OUT", "--force"], "folder", ["bank", "data", "probes", "base"]),
    "train": (["train", "--data", "{data}", "--base", "{base}", "--steps", "1", "--out", "OUT", "--force"], "folder",
              ["data", "base"]),
    "eval": (["eval", "--data", "{data}", "--adapter", "{adapter}", "--predictions", "OUT"], "file",
             ["data", "adapter", "base"]),
    "export gguf": (["export", "gguf", "--adapter", "{adapter}", "--out", "OUT", "--force"], "file", ["adapter", "base"]),
    "export merged": (["export", "merged", "--adapter", "{adapter}", "--out", "OUT", "--force"], "folder",
                      ["adapter", "base"]),
    "bank loo": (["bank", "loo", "{bank}", "--out", "OUT", "--force"], "folder", ["bank", "base"]),
    "bank build": (["bank", "build", "--suite", "{suite}", "--base", "{base}", "--steps", "1", "--out", "OUT"], "folder",
                   ["suite", "base"]),
    "bank pull": (["bank", "pull", "lots-of-loras", "--out", "OUT"], "folder", ["hub cache"]),
    # the output is the entry BANK/x: OUT names the bank
    "bank add": (["bank", "add", "OUT", "{adapter}", "--data", "{data}", "--name", "x", "--force"], "entry",
                 ["adapter", "data"]),
}


def _cases(command: str, what: str, world: dict) -> list[tuple[list[str], str]]:
    """(the command's arguments, how its output then relates to the input `what`: 'is', 'holds' or 'is inside'):
    an output inside an input folder (a new name, a new name in a new subfolder, an existing file) or the folder
    itself; for an input file, the file itself (a file writer) or its folder (a folder writer)."""
    args, kind, _ = WRITERS[command]
    source = world[what]
    fill = {k.replace(" ", "_"): str(v) for k, v in world.items()}

    def filled(out: Path, extra: dict | None = None) -> list[str]:
        return [str(out) if a == "OUT" else (extra or {}).get(a, a.format(**fill) if "{" in a else a) for a in args]

    if kind == "entry":  # bank add: OUT is the bank, the entry BANK/x is written
        if what == "adapter":
            return [(filled(source / "sub"), "is inside")]  # the entry would go inside the adapter it copies
        entry = world["bank"] / "task_animals"  # the entry whose train.jsonl is the data given
        return [(filled(world["bank"], {"x": entry.name, "{data}": str(entry / "train.jsonl")}), "holds")]
    if source.is_dir():
        cases = [(filled(source / "new"), "is inside"), (filled(source / "deeper" / "new.jsonl"), "is inside")]
        # an existing file (replaced by a file writer: the base's weights) or folder (by a folder writer: an entry)
        existing = sorted(p for p in source.iterdir() if p.is_dir() == (kind == "folder"))
        cases += [(filled(source / "model.safetensors" if what == "base" and kind == "file" else existing[0]), "is inside")
                  ] if existing else []
        return cases + ([(filled(source), "is")] if kind == "folder" else [])
    return [(filled(source), "is")] if kind == "file" else [(filled(source.parent), "holds")]


LABELS = {"bank": "the bank", "data": "the data", "probes": "the probe prompts", "base": "the base model",
          "adapter": "the adapter", "suite": "the suite", "hub cache": "the hub cache"}
CASES = [(cmd, what) for cmd, (_, _, inputs) in WRITERS.items() for what in inputs]


@pytest.mark.parametrize("command,what", CASES, ids=[f"{c}-{w}" for c, w in CASES])
def test_every_writer_refuses_an_output_that_is_holds_or_lies_inside_each_of_its_inputs(command, what, world, capsys,
                                                                                         monkeypatch):
    """One rule for every path a command writes, whatever the input: the base model is the one --base names, else
    the one the bank or the adapter names (generate, bank loo, eval and export name none here)."""
    before = tree(world["root"])
    for args, how in _cases(command, what, world):
        code, _, err = run_cli(args, capsys, monkeypatch)
        line = one_line(code, err, "which this command reads; write the output elsewhere")
        assert f": {how} {LABELS[what]} " in line, (args, how, line)
        assert tree(world["root"]) == before, f"{' '.join(args)} changed the disk"


def test_eval_predictions_over_the_base_weights_is_refused_and_a_hard_link_counts(world, capsys, monkeypatch):
    """The reported case (eval --predictions BASE/model.safetensors, the base named by the adapter) and its sibling:
    a hard link to the weights, elsewhere, is the weights."""
    base, data, adapter = world["base"], world["data"], world["adapter"]
    weights = base / "model.safetensors"
    link = world["root"] / "preds.jsonl"
    os.link(weights, link)
    before = tree(world["root"])
    for out in (weights, link, base / "chat_template.jinja"):
        code, _, err = run_cli(["eval", "--data", str(data), "--adapter", str(adapter), "--predictions", str(out)],
                               capsys, monkeypatch)
        one_line(code, err, "the base model", "which this command reads")
        assert tree(world["root"]) == before


def test_predictions_replace_a_file_whole_never_writing_through_a_hard_link(tmp_path):
    from loramix.data import Dataset, Sample
    from loramix.evaluate import write_predictions

    precious = tmp_path / "precious.bin"
    precious.write_bytes(b"weights")
    os.link(precious, tmp_path / "p.jsonl")
    write_predictions(tmp_path / "p.jsonl", Dataset([Sample("a", ("b",))], "d"), ["c"])
    assert precious.read_bytes() == b"weights"
    assert '"prediction": "c"' in (tmp_path / "p.jsonl").read_text()


def test_base_paths_name_the_local_files_a_base_is_read_from(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from loramix.runtime import base_paths

    monkeypatch.setenv("LORAMIX_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert base_paths(None)[0] == tmp_path / "home" / "models" / "SmolLM2-135M-Instruct"
    assert base_paths("default") == base_paths(None) == base_paths("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert base_paths("owner/repo") == [tmp_path / "hub" / "models--owner--repo"]
    assert base_paths("owner/repo/q4.gguf") == [tmp_path / "hub" / "models--owner--repo"]
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert base_paths(str(tmp_path / "m.gguf")) == [tmp_path / "m.gguf"]
    assert base_paths("gpt2") == []


# -- class 7: interrupted and concurrent bank writes ---------------------------------------------------------

def _env(tmp_path: Path) -> dict:
    return {**os.environ, "LORAMIX_PROGRESS": "0", "LORAMIX_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}


# `bank add` as the command runs it, with the copy of its weights file made to end the process by `SIG` half-way:
# after the first file is in the hidden temporary entry folder, as a kill at that moment leaves it.
KILLED_ADD = """
import os, signal, sys, shutil
import loramix.hub as hub
copy = shutil.copyfile
def dying(src, dst, *a, **k):
    copy(src, dst, *a, **k)
    os.kill(os.getpid(), signal.{sig})
hub.shutil.copyfile = dying
sys.argv = ["loramix", "bank", "add", {bank!r}, {adapter!r}, "--data", {data!r}{extra}]
from loramix.cli import main
main()
"""


def _killed_add(tmp_path, sig: str, bank: Path, adapter: Path, data: Path, extra: str = "") -> subprocess.CompletedProcess:
    code = KILLED_ADD.format(sig=sig, bank=str(bank), adapter=str(adapter), data=str(data), extra=extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path), timeout=120)


@pytest.mark.slow  # loramix processes, killed and raced
def test_a_bank_add_killed_into_a_new_bank_does_not_block_the_next(tmp_path):
    """SIGKILL leaves the hidden temporary entry folder (nothing can run then); the next `bank add` recognises it as a
    dead run's (its process is gone, nothing holds its lock), clears it and adds its own entry."""
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 6))
    a1, a2 = write_adapter(tmp_path / "a1", seed=1), write_adapter(tmp_path / "a2", seed=2)
    bank = tmp_path / "bank"
    r = _killed_add(tmp_path, "SIGKILL", bank, a1, data)
    assert r.returncode == -signal.SIGKILL
    leftovers = [p.name for p in bank.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".a1.") and leftovers[0].endswith(".tmp"), leftovers
    r = subprocess.run(CLI + ["bank", "add", str(bank), str(a2), "--data", str(data)], capture_output=True, text=True,
                       env=_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in bank.iterdir()) == ["a2"]  # the dead run's folder is gone
    from loramix import Bank

    assert [e.name for e in Bank(bank).entries] == ["a2"]


@pytest.mark.slow  # loramix processes, killed and raced
def test_a_bank_add_terminated_cleans_up_as_ctrl_c_does(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 6))
    a1 = write_adapter(tmp_path / "a1", seed=1)
    bank = tmp_path / "bank"
    r = _killed_add(tmp_path, "SIGTERM", bank, a1, data)
    assert r.returncode == 128 + signal.SIGTERM and "terminated" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not bank.exists()  # its temporary folder removed, and the bank folder it had made, left empty


@pytest.mark.slow  # loramix processes, killed and raced
def test_a_replacement_killed_between_its_two_renames_gets_the_old_entry_back(tmp_path):
    """`bank add --force` moves the entry aside, then renames the new one in: killed between the two, the entry is
    missing and its old files sit in a hidden .old folder; the next write into the bank puts them back."""
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 6))
    a1, a2 = write_adapter(tmp_path / "a1", seed=1), write_adapter(tmp_path / "a2", seed=2)
    bank = tmp_path / "bank"
    from loramix.hub import add_adapter

    add_adapter(bank, str(a1), data)
    old = (bank / "a1" / "adapter_model.safetensors").read_bytes()
    code = f"""
import os, signal
import loramix.files as files
rename = os.rename
def dying(src, dst):
    if str(src).endswith(".tmp"):
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst)
files.os.rename = dying
from loramix.hub import add_adapter
add_adapter({str(bank)!r}, {str(a2)!r}, {str(data)!r}, name="a1", force=True)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not (bank / "a1").exists() and any(p.name.endswith(".old") for p in bank.iterdir())
    add_adapter(bank, str(a2), data, name="a2")
    assert sorted(p.name for p in bank.iterdir()) == ["a1", "a2"]
    assert (bank / "a1" / "adapter_model.safetensors").read_bytes() == old


def test_leftovers_of_live_runs_are_left_alone(tmp_path):
    """A folder of this (live) process, and one whose process id is gone but whose lock is held (a live run in
    another process namespace), are not a dead run's."""
    import fcntl

    from loramix.files import clear_leftovers

    mine = tmp_path / f".out.{os.getpid()}-abc.tmp"
    held = tmp_path / ".out.999999999-abc.tmp"
    dead = tmp_path / ".other.999999999-xyz.tmp"
    for p in (mine, held, dead):
        p.mkdir()
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert clear_leftovers(tmp_path, "out") == []
        assert clear_leftovers(tmp_path) == [dead.name]
    finally:
        os.close(fd)
    assert mine.exists() and held.exists() and not dead.exists()


def _add(tmp_path, bank, adapter, data) -> subprocess.Popen:
    return subprocess.Popen(CLI + ["bank", "add", str(bank), str(adapter), "--data", str(data)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(tmp_path))


@pytest.mark.slow  # loramix processes, killed and raced
def test_two_concurrent_adds_into_an_empty_bank_both_land_or_one_is_refused_in_one_line(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 6))
    a1, a2 = write_adapter(tmp_path / "a1", seed=1), write_adapter(tmp_path / "a2", seed=2)
    other = write_adapter(tmp_path / "other", seed=3, base="another-base")
    procs = [_add(tmp_path, tmp_path / "bank", a, data) for a in (a1, a2)]
    procs += [_add(tmp_path, tmp_path / "mixed", a, data) for a in (a1, other)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert [code for code, _ in results[:2]] == [0, 0], results
    from loramix import Bank

    assert [e.name for e in Bank(tmp_path / "bank").entries] == ["a1", "a2"]
    assert sorted(code for code, _ in results[2:]) == [0, 1], results  # the second to take the lock is refused
    refused = next(err for code, err in results[2:] if code == 1)
    one_line(1, refused, "base_model_name_or_path", "a bank holds adapters of one base model")
    assert len(Bank(tmp_path / "mixed").entries) == 1
    assert not [p for b in ("bank", "mixed") for p in (tmp_path / b).iterdir() if p.name.startswith(".")]


# -- class 13: what reaches the terminal, bank paths, init adapters of another base --------------------------

def test_bank_list_shows_escape_sequences_in_entry_names_and_never_emits_them(tmp_path, capsys, monkeypatch):
    bank = make_bank(tmp_path / "bank", n=2)
    import loramix.cli

    hostile = "task_\x1b]0;pwned\x07\x1b[2J\x9b31m\u202egnp"
    (bank / "task_animals").rename(bank / hostile)
    monkeypatch.setattr(loramix.cli.out, "width", 400)  # the whole name in one cell
    code, out, err = run_cli(["bank", "list", str(bank)], capsys, monkeypatch)
    assert code == 0, err
    for c in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert c not in out + err
    assert "task_\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202egnp" in out
    (bank / hostile / "adapter_config.json").write_text("{", encoding="utf-8")  # the name in an error line, too
    code, out, err = run_cli(["bank", "list", str(bank)], capsys, monkeypatch)
    line = one_line(code, err, "task_\\x1b]0;pwned")
    assert "\x1b" not in line


def test_sanitize_is_idempotent_and_keeps_text_and_layout_characters():
    from loramix.terminal import sanitize

    text = "caf\u00e9 \u4e2d\u6587\ttab\nline [bold]x[/bold] \\x1b"
    assert sanitize(text) == text
    once = sanitize("a\x1b[31m\x00\x7f\x85\u2066\udcff")
    assert once == "a\\x1b[31m\\x00\\x7f\\x85\\u2066\\xff" and sanitize(once) == once


def test_bank_list_of_a_file_says_it_is_a_file(tmp_path, capsys, monkeypatch):
    f = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 2))
    code, _, err = run_cli(["bank", "list", str(f)], capsys, monkeypatch)
    one_line(code, err, f"{f}: is a file, not a bank folder")
    code, _, err = run_cli(["bank", "list", str(tmp_path / "missing")], capsys, monkeypatch)
    one_line(code, err, "bank folder not found")


def test_a_bank_path_that_is_not_utf8_is_named_not_its_first_entry(tmp_path, capsys, monkeypatch):
    from loramix import Bank

    bank = make_bank(Path(os.fsdecode(bytes(tmp_path) + b"/bank\xff")), n=2)
    with pytest.raises(LoramixError) as e:
        Bank(bank)
    assert str(e.value).startswith(f"{bank}: the bank path is not UTF-8 text (byte 0xff)")
    code, _, err = run_cli(["bank", "list", str(bank)], capsys, monkeypatch)
    line = one_line(code, err, "bank\\xff: the path is not UTF-8 text")  # refused as an argument, before the bank is read
    assert "task_animals" not in line
    good = make_bank(tmp_path / "good", n=2)
    os.rename(good / "task_colors", Path(os.fsdecode(bytes(good) + b"/task_\xfe")))
    with pytest.raises(LoramixError, match=r"^task_.*: the entry's folder name is not UTF-8 text \(byte 0xfe\)"):
        Bank(good)


def test_train_refuses_an_init_adapter_made_for_another_base(tmp_path, tiny_base):
    from loramix.train import base_name, refuse_other_base, train
    from loramix.train_config import TrainConfig

    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 4))
    init = write_adapter(tmp_path / "init", base="mistralai/Mistral-7B-Instruct-v0.2")
    before = tree(tmp_path)
    with pytest.raises(LoramixError, match=r"init: adapter_config.json field 'base_model_name_or_path' is "
                                           r"'mistralai/Mistral-7B-Instruct-v0.2', but training runs on base model"):
        train(data, tmp_path / "t", TrainConfig(steps=1, batch_size=2), base=str(tiny_base), init=init)
    assert tree(tmp_path) == before
    # the same base however it is spelled: a relative or absolute path, the default's names; none named: taken as is
    monkeypatch_cwd = os.getcwd()
    try:
        os.chdir(tiny_base.parent)
        same = write_adapter(tmp_path / "same", base=tiny_base.name)
        refuse_other_base(same, str(tiny_base))
    finally:
        os.chdir(monkeypatch_cwd)
    assert base_name(None) == base_name("default") == base_name("HuggingFaceTB/SmolLM2-135M-Instruct")
    refuse_other_base(write_adapter(tmp_path / "unnamed", base=None), str(tiny_base))
    refuse_other_base(write_adapter(tmp_path / "default", base="HuggingFaceTB/SmolLM2-135M-Instruct"), None)
    with pytest.raises(LoramixError, match="training runs on base model 'HuggingFaceTB/SmolLM2-135M-Instruct'"):
        refuse_other_base(init, None)
