"""Bank entries without training data: signed by their answers to probe prompts, alone or beside entries with data."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import make_bank, topic_records, write_jsonl
from test_errors import _assert_clean_failure, run_cli

import loramix.probes
from loramix import Bank, generate, read_report
from loramix.config import GenerateConfig
from loramix.data import Dataset, read_dataset
from loramix.distances import aligned
from loramix.errors import LoramixError
from loramix.index import BankIndex
from loramix.bank_operator import loo_coefficients
from loramix.pipeline import leave_one_out
from loramix.runtime.pytorch import load_model, load_tokenizer
from loramix.probes import DEFAULT_PROBES, ProbeSet, answer_probes


@pytest.fixture
def user_data(tmp_path):
    return write_jsonl(tmp_path / "fruit_task.jsonl", topic_records("fruits", n=30, seed=99))


@pytest.fixture
def own_data_answers(monkeypatch):
    """Entries 'answer' the probes with their own training data (read when first asked, kept after the file is gone):
    probe signatures then equal data signatures, the premise of an equivalent data-free signature."""
    kept: dict[str, Dataset] = {}

    def fake(model, tokenizer, bank, entry, prompts):
        if entry.name not in kept:
            kept[entry.name] = read_dataset(entry.data_file)
        return kept[entry.name]

    monkeypatch.setattr(loramix.probes, "answer_probes", fake)
    return kept


def test_aligned_maps_probe_distances_onto_the_data_scale():
    d_probes = np.array([1.0, 2.0, 3.0, 4.0, 5.0, np.inf])
    d_data = np.array([12.0, 14.0, 16.0, np.nan, np.nan, np.nan])  # = 2 d_probes + 10 where known
    got = aligned(d_probes, d_data)
    np.testing.assert_allclose(got[:5], [12, 14, 16, 18, 20])
    assert math.isinf(got[5])  # an entry left out stays out
    # no relation (or an inverse one) between the two: a data-free entry gets the data entries' mean
    np.testing.assert_allclose(aligned(np.array([3.0, 2.0, 1.0, 7.0]), np.array([1.0, 2.0, 3.0, np.nan]))[3], 2.0)
    with pytest.raises(LoramixError, match="at least 2 entries with data"):
        aligned(np.array([1.0, 2.0]), np.array([1.0, np.nan]))


def test_probe_set_prompts_and_key(tmp_path):
    default = ProbeSet()
    assert len(default.prompts) == len(read_dataset(DEFAULT_PROBES)) == 48
    assert default.key("a") != default.key("b")  # answers depend on the base model
    own = write_jsonl(tmp_path / "mine.jsonl", [{"input": "hello", "output": ""}] * 3 + [{"input": "bye", "output": ""}])
    assert ProbeSet(str(own)).prompts == ["hello", "bye"]  # each prompt once
    assert ProbeSet(str(own)).key("a") != default.key("a")
    assert len(ProbeSet(max_samples=10).prompts) == 10
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"input": " ", "output": "x"}])
    with pytest.raises(LoramixError, match="blank.jsonl: no probe prompts"):
        ProbeSet(str(blank)).prompts
    with pytest.raises(LoramixError, match="not found|no such"):
        ProbeSet(str(tmp_path / "missing.jsonl")).prompts


def test_answer_probes_runs_the_entry_and_leaves_the_base_unchanged(tmp_path, tiny_base):
    bank = Bank(make_bank(tmp_path / "bank", n=2, base=str(tiny_base)))
    model, tok = load_model(str(tiny_base)), load_tokenizer(str(tiny_base))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts = ["give me some animals words", "give me some colors words about red"]
    answers = [answer_probes(model, tok, bank, e, prompts) for e in bank.entries]
    assert [s.input for s in answers[0]] == prompts
    assert [s.output for s in answers[0]] != [s.output for s in answers[1]]  # each entry answers in its own way
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any("lora" in n for n, _ in model.named_modules())


def test_mode_follows_how_many_entries_have_data(tmp_path):
    root = make_bank(tmp_path / "bank", n=4)
    assert BankIndex(Bank(root)).mode("auto").name == "data"
    (root / "task_animals" / "train.jsonl").unlink()
    assert BankIndex(Bank(root)).mode("auto").name == "mixed"
    (root / "task_colors" / "train.jsonl").unlink()
    index = BankIndex(Bank(root))
    assert index.mode("auto").name == "probes"  # two entries with data are too few to align on
    assert index.mode("data").name == "data" and [e.name for e in index.weighted("data")] == ["task_fruits", "task_numbers"]
    assert len(index.weighted("auto")) == 4


def test_a_bank_without_data_composes_from_probe_answers(tmp_path, tiny_base, user_data, capsys, monkeypatch):
    """Through the CLI, with the real tiny base answering the shipped probes; the answers are cached in the index."""
    root = make_bank(tmp_path / "bank", n=4, base=str(tiny_base))
    for f in root.glob("*/train.jsonl"):
        f.unlink()
    out = tmp_path / "out"
    code, err = run_cli(["generate", "--bank", str(root), "--data", str(user_data), "--out", str(out), "--check", "0"],
                        capsys, monkeypatch)
    assert code == 0, err
    report = read_report(out)
    assert report.entry_signatures == "probes" and report.probes == "default"
    assert sorted(report.probed) == sorted(report.coefficients) == [f"task_{t}" for t in ("animals", "colors", "fruits", "numbers")]
    assert sum(report.coefficients.values()) == pytest.approx(1.0) and report.excluded == []
    assert len(report.distances) == 4
    stored = list((root / ".loramix").rglob("probes/*/*.json"))
    assert len(stored) == 4 and all(len(json.loads(p.read_text())) == 48 for p in stored)

    def refuse(*a, **k):
        raise AssertionError("probe answers are cached")

    monkeypatch.setattr(loramix.probes, "answer_probes", refuse)
    again = tmp_path / "again"
    code, err = run_cli(["generate", "--bank", str(root), "--data", str(user_data), "--out", str(again), "--check", "0"],
                        capsys, monkeypatch)
    assert code == 0, err
    assert read_report(again).coefficients == report.coefficients


def test_an_entry_weight_does_not_jump_when_it_loses_its_data(tmp_path, tiny_base, own_data_answers, user_data):
    """With a data-free signature equal to the data one, the mixed bank's alignment is the identity: losing a
    train.jsonl changes no coefficient."""
    root = make_bank(tmp_path / "bank", n=6, base=str(tiny_base))
    before = generate(root, user_data, tmp_path / "a", check=0).coefficients
    for e in Bank(root).entries:  # each entry's answers, read while its data is there
        loramix.probes.answer_probes(None, None, None, e, [])
    (root / "task_colors" / "train.jsonl").unlink()
    after = generate(root, user_data, tmp_path / "b", check=0, entry_signatures="auto")
    report = read_report(tmp_path / "b")
    assert report.entry_signatures == "mixed" and report.probed == ["task_colors"]
    assert before.keys() == after.coefficients.keys()
    for name, c in before.items():
        assert after.coefficients[name] == pytest.approx(c, rel=1e-6, abs=1e-9), name
    # 'data' drops it instead: its weight goes to the others
    dropped = generate(root, user_data, tmp_path / "c", check=0, entry_signatures="data").coefficients
    assert "task_colors" not in dropped and sum(dropped.values()) == pytest.approx(1.0)


def test_leave_one_out_with_data_hidden_matches_data_when_answers_are_the_data(tmp_path, tiny_base, own_data_answers):
    """`--entry-signatures probes` leaves every entry's data out of its signature; the held-out entries' own data still
    make the rows. When probe answers equal the data, the coefficients are those of the data mode."""
    root = make_bank(tmp_path / "bank", n=5, base=str(tiny_base))
    bank = Bank(root)
    index = BankIndex(bank)
    data = loo_coefficients(index, GenerateConfig(entry_signatures="data"))
    probes = leave_one_out(bank, tmp_path / "loo", entry_signatures="probes")
    assert probes.shape == (5, 5) and np.all(np.diag(probes) == 0)
    np.testing.assert_allclose(probes, data, atol=1e-9)
    report = read_report(tmp_path / "loo" / "task_animals")
    assert report.entry_signatures == "probes" and report.leave_one_out == "task_animals"
    assert report.coefficients["task_animals"] == 0


def test_leave_one_out_in_a_mixed_bank_weights_entries_without_data(tmp_path, tiny_base, own_data_answers):
    root = make_bank(tmp_path / "bank", n=6, base=str(tiny_base))
    for e in Bank(root).entries:
        loramix.probes.answer_probes(None, None, None, e, [])
    (root / "task_colors" / "train.jsonl").unlink()
    bank = Bank(root)
    c = loo_coefficients(BankIndex(bank), GenerateConfig())
    assert c.shape == (5, 6)  # rows: entries with data; columns: every entry
    names = [e.name for e in bank.entries]
    assert np.all(c[:, names.index("task_colors")] > 0)
    for t, e in enumerate(bank.usable):
        assert c[t, names.index(e.name)] == 0 and c[t].sum() == pytest.approx(1.0)


def test_data_mode_without_data_and_probes_without_a_base_fail_in_one_line(tmp_path, user_data, capsys, monkeypatch):
    root = make_bank(tmp_path / "bank", n=3, base=None)
    out = tmp_path / "out"
    code, err = run_cli(["generate", "--bank", str(root), "--data", str(user_data), "--out", str(out), "--check", "0",
                         "--entry-signatures", "probes"], capsys, monkeypatch)
    _assert_clean_failure(code, err, "needs the base model, and the bank names none", out)
    for f in root.glob("*/train.jsonl"):
        f.unlink()
    code, err = run_cli(["generate", "--bank", str(root), "--data", str(user_data), "--out", str(out), "--check", "0",
                         "--entry-signatures", "data"], capsys, monkeypatch)
    _assert_clean_failure(code, err, "no bank entry has training data .* --entry-signatures data", out)
    code, err = run_cli(["generate", "--bank", str(root), "--data", str(user_data), "--out", str(out),
                         "--entry-signatures", "none"], capsys, monkeypatch)
    assert code != 0 and "Traceback" not in err and "entry-signatures" in err


def test_bank_index_and_list_for_a_bank_without_data(tmp_path, tiny_base, own_data_answers):
    from typer.testing import CliRunner

    from loramix.cli import app

    root = make_bank(tmp_path / "bank", n=4, base=str(tiny_base))
    for e in Bank(root).entries:
        loramix.probes.answer_probes(None, None, None, e, [])
    (root / "task_animals" / "train.jsonl").unlink()
    r = CliRunner().invoke(app, ["bank", "index", str(root), "--distance", "gaussian-w2"])
    assert r.exit_code == 0, r.output
    assert "3 signatures" in r.output and "4 probe-answer signatures" in r.output and "3 x 4" in r.output
    r = CliRunner().invoke(app, ["bank", "list", str(root)])
    assert "no data" in r.output
    for f in root.glob("*/train.jsonl"):
        f.unlink()
    r = CliRunner().invoke(app, ["bank", "index", str(root), "--distance", "gaussian-w2"])
    assert "--distance needs entries with data" in str(r.exception)
