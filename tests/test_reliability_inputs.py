"""Issue 37, classes 8-11 and two items of 13: strict dataset readers, the Python API's argument types, messages that
name their file, and sizes bounded before anything is allocated. Every refusal is one LoramixError line."""

from __future__ import annotations

import csv
import errno
import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import TINY_SHAPES, make_bank, topic_records, write_jsonl

from loramix import Bank, LoramixError, SignatureSpec, compose, generate, read_dataset
from loramix.train_config import TrainConfig


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


# ---- class 8: dataset readers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix,sep", [(".csv", ","), (".tsv", "\t")])
def test_text_after_a_closing_quote_is_refused_with_its_line_not_read_without_quotes(tmp_path, suffix, sep):
    path = tmp_path / f"d{suffix}"
    path.write_text(f"input{sep}output\nok{sep}fine\n\"5\" screen{sep}big\n", encoding="utf-8")
    with pytest.raises(LoramixError, match=rf"d{suffix}:3: not valid {suffix[1:].upper()} \(.*text follows a closing quote"):
        read_dataset(path)


def test_an_unclosed_quote_does_not_merge_lines_into_one_record(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text('input\toutput\na\tb\n"unclosed\tx\nnext\tline\n', encoding="utf-8")
    with pytest.raises(LoramixError, match=r"d.tsv:3: not valid TSV \(a quoted field is never closed") as e:
        read_dataset(path)
    one_line(e)


def test_well_quoted_fields_are_still_read_whole(tmp_path):
    """What csv.writer writes (quotes doubled, delimiters and line breaks inside quoted fields) reads back."""
    rows = [{"input": 'the "5" screen', "output": "a\tb\nc"}, {"input": "x, y", "output": '""'}]
    for suffix, sep in ((".csv", ","), (".tsv", "\t")):
        path = tmp_path / f"d{suffix}"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["input", "output"], delimiter=sep)
            w.writeheader()
            w.writerows(rows)
        assert [(s.input, s.output) for s in read_dataset(path)] == [(r["input"], r["output"]) for r in rows]


@pytest.mark.parametrize("name,text", [("d.csv", ""), ("d.tsv", "\n\n"), ("d.jsonl", ""), ("d.json", "")])
def test_an_empty_file_says_it_is_empty(tmp_path, name, text):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(LoramixError, match=rf"{name}: the dataset has no samples \(the file is empty\)"):
        read_dataset(tmp_path / name)


def test_a_header_only_csv_has_no_samples(tmp_path):
    (tmp_path / "d.csv").write_text("input,output\n", encoding="utf-8")
    with pytest.raises(LoramixError, match=r"d.csv: the dataset has no samples"):
        read_dataset(tmp_path / "d.csv")


def _save(folder: Path, rows: dict) -> Path:
    import datasets

    datasets.Dataset.from_dict(rows).save_to_disk(str(folder))
    return folder


def test_a_save_to_disk_dataset_without_rows_has_no_samples(tmp_path):
    folder = _save(tmp_path / "empty", {"input": [], "output": []})
    with pytest.raises(LoramixError, match=r"empty: the dataset has no samples") as e:
        read_dataset(folder)
    one_line(e)


@pytest.mark.parametrize("where", ["parent", "absolute", "link"])
def test_state_json_data_files_that_leave_the_folder_are_refused_unopened(tmp_path, where, monkeypatch):
    import datasets

    outside = _save(tmp_path / "outside", {"input": ["secret"], "output": ["x"]})
    arrow = next(outside.glob("*.arrow"))
    folder = _save(tmp_path / "ds", {"input": ["a"], "output": ["b"]})
    state = json.loads((folder / "state.json").read_text())
    if where == "link":
        (folder / "link.arrow").symlink_to(arrow)
        name = "link.arrow"
    else:
        name = f"../outside/{arrow.name}" if where == "parent" else str(arrow)
    state["_data_files"] = [{"filename": name}]
    (folder / "state.json").write_text(json.dumps(state))
    opened = []
    monkeypatch.setattr(datasets.Dataset, "load_from_disk", lambda *a, **k: opened.append(a))
    with pytest.raises(LoramixError, match=r"ds: state.json's data file '.*' leads outside the dataset folder"):
        read_dataset(folder)
    assert not opened


def test_a_dataset_dict_split_that_leaves_the_folder_is_refused(tmp_path):
    import datasets

    _save(tmp_path / "outside", {"input": ["secret"], "output": ["x"]})
    folder = tmp_path / "dd"
    ds = datasets.Dataset.from_dict({"input": ["a"], "output": ["b"]})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(folder))
    assert [s.input for s in read_dataset(folder)] == ["a"]
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["../outside"]}))
    with pytest.raises(LoramixError, match=r"dd: dataset_dict.json's split '../outside' leads outside"):
        read_dataset(folder, split="../outside")


# ---- class 9: the Python API ----------------------------------------------------------------------------------------

def test_generate_refuses_a_string_for_force_and_keeps_the_existing_output(tmp_path):
    bank = make_bank(tmp_path / "bank", n=3)
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 8))
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(LoramixError, match=r"^generate\(\): force must be bool, got str 'no'$"):
        generate(bank, data, out, force="no", check=0)
    with pytest.raises(LoramixError, match=r"^generate\(\): allow_pickle must be bool, got str 'false'$"):
        generate(bank, data, tmp_path / "o2", allow_pickle="false", check=0)
    with pytest.raises(LoramixError, match=r"unknown setting\(s\) topk"):
        generate(bank, data, tmp_path / "o3", topk=3)
    with pytest.raises(LoramixError, match=r"^generate\(\): data must be str or Path or Dataset, got int 5$"):
        generate(bank, 5, tmp_path / "o4")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_compose_takes_a_dtype_by_name_and_refuses_others(tmp_path):
    bank = Bank(make_bank(tmp_path / "bank", n=2))
    c = {e.name: 0.5 for e in bank.entries}
    comp = compose(bank, c, dtype="float16")
    assert all(a.dtype == torch.float16 and b.dtype == torch.float16 for a, b in comp.factors.values())
    with pytest.raises(LoramixError, match=r"dtype must be one of float32, float16, bfloat16 .*got 'int8'") as e:
        compose(bank, c, dtype="int8")
    one_line(e)
    with pytest.raises(LoramixError, match=r"^plan\(\): rank must be int or 'full' or None, got str 'half'$"):
        compose(bank, c, rank="half")
    with pytest.raises(LoramixError, match=r"^plan\(\): unexpected argument|got an unexpected keyword argument 'size'"):
        compose(bank, c, size=3)


@pytest.mark.parametrize("call,want", [
    (lambda p: Bank(p, allow_pickle="no"), r"^Bank\(\): allow_pickle must be bool, got str 'no'$"),
    (lambda p: Bank(3), r"^Bank\(\): path must be str or Path, got int 3$"),
    (lambda p: read_dataset(["x.jsonl"]), r"^read_dataset\(\): path must be str or Path, got list"),
    (lambda p: read_dataset(p / "x.jsonl", with_definition="no"), r"with_definition must be bool, got str 'no'"),
    (lambda p: TrainConfig(bf16="no"), r"^TrainConfig: bf16 must be bool, got str 'no'$"),
    (lambda p: TrainConfig(seed="1"), r"^TrainConfig: seed must be int, got str '1'$"),
    (lambda p: TrainConfig(steps="3"), r"^steps must be a whole number"),
    (lambda p: SignatureSpec(max_samples=2.5), r"^SignatureSpec: max_samples must be int or None, got float 2.5$"),
    (lambda p: __import__("loramix.refine").refine.RefineConfig(per_layer="yes"), r"RefineConfig: per_layer must be bool"),
    (lambda p: __import__("loramix.evaluate").evaluate.evaluate(p / "x.jsonl", batch_size=0),
     r"^evaluate\(\): batch_size must be at least 1, got 0$"),
    (lambda p: __import__("loramix.evaluate").evaluate.evaluate(p / "x.jsonl", max_new_tokens=10**9),
     r"^evaluate\(\): max_new_tokens must be at most 8,192"),
    (lambda p: __import__("loramix.evaluate").evaluate.evaluate(p / "x.jsonl", limit=True), r"limit must be int or None"),
    (lambda p: __import__("loramix.export").export.export_merged(p / "a", p / "b", force="yes"),
     r"^export_merged\(\): force must be bool, got str 'yes'$"),
    (lambda p: __import__("loramix.train").train.train(p / "x.jsonl", p / "o", {"steps": 3}),
     r"^train\(\): config must be TrainConfig or None, got dict"),
    (lambda p: __import__("loramix").coefficients([1.0, 2.0], temperature=float("nan")),
     r"^coefficients\(\): temperature must be finite, got nan$"),
])
def test_wrong_types_from_the_python_api_are_one_line_naming_the_argument(tmp_path, call, want):
    (tmp_path / "bank").mkdir()
    with pytest.raises(LoramixError, match=want) as e:
        call(tmp_path)
    one_line(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]  # nothing written


# ---- class 10: messages and environment -----------------------------------------------------------------------------

@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("YES", True), ("0", False), ("false", False),
                                      ("no", False), ("", False), ("off", False)])
def test_only_1_true_or_yes_in_loramix_debug_turns_tracebacks_on(monkeypatch, value, on):
    from loramix.errors import debug_from_env

    monkeypatch.setenv("LORAMIX_DEBUG", value)
    assert debug_from_env() is on


def test_loramix_debug_0_keeps_errors_one_line(tmp_path):
    import subprocess

    env = {**os.environ, "LORAMIX_DEBUG": "0", "LORAMIX_PROGRESS": "0"}
    r = subprocess.run([sys.executable, "-c", "from loramix.cli import main; main()", "bank", "list", str(tmp_path / "no")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.strip().startswith("error:")


def test_a_loramix_home_that_is_a_file_is_named(tmp_path, monkeypatch):
    from loramix.paths import loramix_home

    home = tmp_path / "home"
    home.write_text("")
    monkeypatch.setenv("LORAMIX_HOME", str(home))
    with pytest.raises(LoramixError, match=rf"^LORAMIX_HOME {home} is a file, not a folder"):
        loramix_home()
    monkeypatch.setenv("LORAMIX_HOME", str(home / "sub"))
    with pytest.raises(LoramixError, match=rf"LORAMIX_HOME {home / 'sub'} lies under {home}, which is a file"):
        loramix_home()


def _full_disk(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
    from loramix.files import atomic_dir, atomic_write_bytes

    monkeypatch.setattr(os, "fsync", _full_disk)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(tmp_path / "cache.npy", b"x")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "cache.npy")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError) as e:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a").write_text("x")
            _full_disk()
    assert e.value.filename == str(tmp_path / "out") and list(tmp_path.iterdir()) == []


def test_a_full_disk_during_generate_is_one_line_naming_the_output(tmp_path, monkeypatch, capsys):
    from loramix import adapter
    from loramix.cli import main

    bank = make_bank(tmp_path / "bank", n=2)
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 6))
    monkeypatch.setattr(adapter.SafetensorsWriter, "write", _full_disk)
    monkeypatch.setattr(sys, "argv", ["loramix", "generate", "--bank", str(bank), "--data", str(data), "--out",
                                      str(tmp_path / "out"), "--check", "0", "--max-samples", "4"])
    monkeypatch.delenv("LORAMIX_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and err == f"error: No space left on device: {tmp_path / 'out'}"
    assert not (tmp_path / "out").exists()


# ---- class 11: sizes bounded before allocation ----------------------------------------------------------------------

def test_generate_clamps_a_rank_above_the_modules_before_allocating(tmp_path, caplog):
    bank = make_bank(tmp_path / "bank", n=3)
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 8))
    most = max(min(shape) for shape in TINY_SHAPES.values())  # 32 x 32 q_proj: 32 singular values at most
    with caplog.at_level("WARNING", logger="loramix"):
        result = generate(bank, data, tmp_path / "out", rank=100_000_000, check=0, max_samples=10**12, top_k=10**9)
    assert result.report.rank == most
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == most
    assert "rank 100,000,000 is more than any module has (at most 32" in caplog.text
    full = compose(Bank(bank), result.coefficients, rank="full")
    clamped = compose(Bank(bank), result.coefficients, rank=10**8)
    for m, (a, b) in clamped.factors.items():  # the same update as every singular value kept
        fa, fb = full.factors[m]
        assert torch.allclose(b.double() @ a.double(), fb.double() @ fa.double(), atol=1e-5)


def test_train_refuses_a_rank_above_the_modules_before_allocating(tmp_path, tiny_base):
    from loramix.train import train

    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 4))
    with pytest.raises(LoramixError, match=r"^rank=100000000 is more than the modules target_modules=q_proj,k_proj,"
                                           r"v_proj selects can hold \(at most 32: min\(in, out\)\)"):
        train(data, tmp_path / "out", TrainConfig(rank=100_000_000, steps=1), base=str(tiny_base))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value", [("check", 10**9), ("check_singles", 10**9), ("check_tops", 10**9)])
def test_check_sizes_beyond_the_data_and_bank_are_bounded_by_them(tmp_path, tiny_base, field, value):
    bank = make_bank(tmp_path / "bank", n=3, base=str(tiny_base))
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 6))
    result = generate(bank, data, tmp_path / "out", max_samples=4, check_criterion="loss",
                      **({"check": 2} if field != "check" else {}), **{field: value})
    chk = result.report.check
    assert chk is not None and chk.examples <= 6 and len(chk.candidates) <= 1 + 4 + 3 + 3


# ---- class 13: nevergrad without scipy's RHOEND warning -------------------------------------------------------------

def test_nevergrad_refinement_prints_no_rhoend_warning_and_keeps_other_filters(tmp_path, tiny_base):
    from loramix.refine import RefineConfig, refine

    bank = Bank(make_bank(tmp_path / "bank", n=3, base=str(tiny_base)))
    data = read_dataset(write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 8)))
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refine(bank, {e.name: 1 / 3 for e in bank.entries}, data, RefineConfig(examples=3, top_k=3, method="nevergrad", steps=8))
        warnings.warn("another warning", UserWarning)
    texts = [str(w.message) for w in caught]
    assert not any("RHOEND" in t for t in texts) and "another warning" in texts
    assert list(warnings.filters) == before
