"""Calibration on the bank's own leave-one-out, and the held-out check on the user's labels (forward passes, and
greedy answers for the generating criterion)."""

import json

import numpy as np
import pytest
import torch
from helpers import make_bank, topic_records, write_jsonl
from typer.testing import CliRunner

from loramix import Bank, generate, read_report
from loramix.calibrate import Candidate, cached_calibration, calibrate
from loramix.check import check
from loramix.cli import app
from loramix.config import GenerateConfig
from loramix.errors import LoramixError
from loramix.index import BankIndex
from loramix.bank_operator import loo_coefficients
from loramix.runtime.pytorch import load_model, load_tokenizer
from loramix.operators import AnswerTrained, BankFit, coefficients
from loramix.runtime.lora import MixedLoRA
from loramix.runtime.pytorch import answer_loss_fn
from loramix.runtime.scores import AnswerScores

GRID = [Candidate(t, k, s) for t in (0.5, 1.0) for k in (None, 2) for s in (1.0, 2.0)]


@pytest.fixture
def tiny_bank(tmp_path, tiny_base):
    return Bank(make_bank(tmp_path / "bank", n=5, base=str(tiny_base)))


def test_calibration_scores_every_candidate_on_held_out_entries(tiny_bank, tiny_base):
    model, tok = load_model(str(tiny_base)), load_tokenizer(str(tiny_base))
    cfg = GenerateConfig(max_samples=8)
    cal = calibrate(tiny_bank, cfg, examples=4, candidates=GRID, model=model, tokenizer=tok)
    n = len(tiny_bank.usable)
    assert np.asarray(cal.loss).shape == (n, len(GRID)) and len(cal.base_loss) == n
    assert cal.best == GRID[int(np.argmin(cal.ratios().mean(0)))]
    # one entry's loss recomputed by hand: its leave-one-out coefficients at the candidate, times the scale
    t, j = 2, 5
    c = GRID[j]
    coefs = loo_coefficients(BankIndex(tiny_bank), GenerateConfig(max_samples=8, temperature=c.temperature, top_k=c.top_k))
    assert coefs[t, t] == 0
    mixed = MixedLoRA(model, tiny_bank, tiny_bank.usable)
    try:
        mixed.weights = torch.as_tensor(c.scale * coefs[t], dtype=torch.float32)
        fn = answer_loss_fn(model, tok, tiny_bank.usable[t].dataset().subsample(4, 0).samples)
        with torch.no_grad():
            assert float(fn()) == pytest.approx(cal.loss[t][j], rel=1e-5)
    finally:
        mixed.remove()
    # cached with the bank index: the same object back without the model
    again = calibrate(tiny_bank, cfg, examples=4, candidates=GRID)
    assert again.loss == cal.loss and again.best == cal.best
    # more examples than any entry has: what is used is recorded, and two such requests are one calibration
    most = max(len(e.dataset()) for e in tiny_bank.usable)
    beyond = calibrate(tiny_bank, cfg, examples=most + 100, candidates=GRID, model=model, tokenizer=tok)
    assert beyond.examples == most
    assert calibrate(tiny_bank, cfg, examples=most + 500, candidates=GRID).loss == beyond.loss
    assert cal.select([0, 1]) == GRID[int(np.argmin(cal.ratios()[[0, 1]].mean(0)))]


def test_generate_uses_the_banks_calibration_and_says_so(tiny_bank, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("fruits", 12))
    assert cached_calibration(tiny_bank, GenerateConfig(max_samples=8)) is None
    cal = calibrate(tiny_bank, GenerateConfig(max_samples=8), examples=4)
    r = generate(tiny_bank, data, tmp_path / "cal", max_samples=8, calibration=True, check=0)
    report = read_report(tmp_path / "cal")
    assert report.calibration is not None and report.temperature == cal.best.temperature
    assert (report.top_k, report.scale) == (cal.best.top_k, cal.best.scale)
    assert sum(r.coefficients.values()) == pytest.approx(cal.best.scale)
    plain = generate(tiny_bank, data, tmp_path / "plain", max_samples=8, check=0)  # off by default
    assert read_report(tmp_path / "plain").calibration is None
    assert sum(plain.coefficients.values()) == pytest.approx(1.0)
    out = CliRunner().invoke(app, ["generate", "--bank", str(tiny_bank.path), "--data", str(data), "--out",
                                   str(tmp_path / "cli"), "--max-samples", "8", "--calibration", "--check", "0"])
    assert out.exit_code == 0, out.output
    assert "using the bank's calibration" in out.output


def test_check_keeps_the_candidate_of_lowest_held_out_loss(tiny_bank, tiny_base, tmp_path, monkeypatch):
    model, tok = load_model(str(tiny_base)), load_tokenizer(str(tiny_base))
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("fruits", 12))
    from loramix import read_dataset

    ds = read_dataset(data)
    coefs = {e.name: 0.1 + 0.1 * i for i, e in enumerate(tiny_bank.usable)}
    res = check(tiny_bank, coefs, ds, examples=4, scales=(1.0, 30.0), singles=2, model=model, tokenizer=tok)
    top = sorted(coefs, key=coefs.get)[::-1][:2]
    assert list(res.candidates) == ["base", "x1", "x30", *(f"entry:{n}" for n in top)]
    assert res.chosen == min(res.candidates, key=lambda k: res.candidates[k]["loss"])
    assert len({v["loss"] for v in res.candidates.values()}) == len(res.candidates)  # every candidate changes the loss
    expect = {"base": dict.fromkeys(coefs, 0.0), "x1": coefs, "x30": {n: 30 * c for n, c in coefs.items()},
              **{f"entry:{n}": {**dict.fromkeys(coefs, 0.0), n: 1.0} for n in top}}
    assert res.coefficients == pytest.approx(expect[res.chosen])
    # each candidate's held-out scores are the model's with that mixed update
    mixed = MixedLoRA(model, tiny_bank, tiny_bank.usable)
    try:
        for label, w in [("x30", [30 * coefs[e.name] for e in tiny_bank.usable]),
                         (f"entry:{top[0]}", [float(e.name == top[0]) for e in tiny_bank.usable])]:
            mixed.weights = torch.tensor(w)
            with torch.no_grad():
                assert float(answer_loss_fn(model, tok, ds.subsample(4, 0).samples)()) == pytest.approx(res.candidates[label]["loss"], rel=1e-5)
    finally:
        mixed.remove()
    by_accuracy = check(tiny_bank, coefs, ds, examples=4, scales=(1.0, 30.0), singles=2, criterion="accuracy",
                        model=model, tokenizer=tok)
    assert by_accuracy.chosen == min(by_accuracy.candidates, key=lambda k: (-by_accuracy.candidates[k]["accuracy"], by_accuracy.candidates[k]["loss"]))
    with pytest.raises(LoramixError, match="unknown check criterion"):
        check(tiny_bank, coefs, ds, examples=4, criterion="vibes", model=model, tokenizer=tok)

    import loramix.check

    scores = iter([AnswerScores(1.0, 0, 0), AnswerScores(1.5, 0, 0), AnswerScores(2.0, 0, 0)])
    monkeypatch.setattr(loramix.check, "answer_scores_fn", lambda *a, **k: (lambda: next(scores)))
    base_wins = check(tiny_bank, coefs, ds, examples=4, scales=(1.0, 2.0), model=model, tokenizer=tok)
    assert base_wins.chosen == "base" and not base_wins.beats_base and set(base_wins.coefficients.values()) == {0.0}


def test_check_candidates_keep_the_top_entries_at_the_compositions_total_weight():
    from loramix.check import check_candidates

    coefs = {"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.05, "e": 0.0}
    cands = check_candidates(coefs, scales=(1.0,), singles=1, tops=4)
    # top4 would keep every non-zero entry, i.e. be x1 again: not repeated
    assert list(cands) == ["base", "x1", "top2", "top3", "entry:a"]
    assert cands["top2"] == pytest.approx({"a": 0.625, "b": 0.375, "c": 0.0, "d": 0.0, "e": 0.0})
    assert cands["top3"] == pytest.approx({"a": 0.5 / 0.95, "b": 0.3 / 0.95, "c": 0.15 / 0.95, "d": 0.0, "e": 0.0})
    assert all(sum(cands[f"top{k}"].values()) == pytest.approx(1.0) for k in (2, 3))
    # a huge --check-tops is bounded by the entries there are, not looped over
    assert list(check_candidates(coefs, scales=(1.0,), tops=10**12)) == ["base", "x1", "top2", "top3"]


def test_exact_criterion_ranks_whole_answers_then_accuracy_then_loss():
    from loramix.runtime.scores import CRITERIA

    scores = {"base": AnswerScores(1.0, 0.9, 0.25), "x1": AnswerScores(2.0, 0.5, 0.5), "x2": AnswerScores(0.5, 0.6, 0.5)}
    assert min(scores, key=lambda k: CRITERIA.get("exact").key(scores[k])) == "x2"
    assert min(scores, key=lambda k: CRITERIA.get("accuracy").key(scores[k])) == "base"
    assert min(scores, key=lambda k: CRITERIA.get("loss").key(scores[k])) == "x2"
    with pytest.raises(LoramixError, match="check_tops"):
        GenerateConfig(check_tops=-1)


def test_rouge_criterion_scores_each_candidates_greedy_answers(tiny_bank, tiny_base, tmp_path, monkeypatch):
    from loramix import read_dataset
    from loramix.runtime.pytorch import generate_answers
    from loramix.runtime.scores import score
    from loramix.runtime.scores import CRITERIA

    model, tok = load_model(str(tiny_base)), load_tokenizer(str(tiny_base))
    ds = read_dataset(write_jsonl(tmp_path / "task.jsonl", topic_records("fruits", 12)))
    coefs = {e.name: 0.2 for e in tiny_bank.usable}
    res = check(tiny_bank, coefs, ds, examples=4, scales=(1.0, 30.0), singles=1, criterion="rouge", model=model, tokenizer=tok)
    assert all(0 <= v["rouge"] <= 1 for v in res.candidates.values())
    assert res.chosen == min(res.candidates, key=lambda k: CRITERIA.get("rouge").key(AnswerScores(**res.candidates[k])))
    # the base's score is `loramix evaluate`'s ROUGE-L of its greedy answers, cut at twice the longest reference
    # (end-of-turn included) and 4 tokens more
    held = ds.subsample(4, 0).samples
    cap = 2 * max(len(tok(s.output, add_special_tokens=False)["input_ids"]) + 1 for s in held) + 4
    answers = generate_answers(model, tok, [s.input for s in held], max_new_tokens=min(48, cap))
    assert res.candidates["base"]["rouge"] == pytest.approx(score(answers, type(ds)(held, ds.source))["rougeL"])
    # the teacher-forced criteria do not generate
    assert all("rouge" not in v for v in check(tiny_bank, coefs, ds, examples=4, scales=(1.0,), model=model,
                                               tokenizer=tok).candidates.values())
    ranked = {"base": AnswerScores(1.0, 0.9, 0.5, 0.2), "x1": AnswerScores(2.0, 0.5, 0.0, 0.6),
              "x2": AnswerScores(0.5, 0.6, 0.0, 0.6)}
    assert min(ranked, key=lambda k: CRITERIA.get("rouge").key(ranked[k])) == "x2"  # ties on ROUGE-L go to accuracy
    monkeypatch.setenv("LORAMIX_PROGRESS", "1")  # the check's bar, with no generation bar inside it
    generate(tiny_bank, ds, tmp_path / "rouge", max_samples=8, check=4, check_singles=1, check_criterion="rouge")
    chk = read_report(tmp_path / "rouge").check
    assert chk.criterion == "rouge" and all(set(v) == {"loss", "accuracy", "exact", "rouge"} for v in chk.candidates.values())
    out = CliRunner().invoke(app, ["generate", "--bank", str(tiny_bank.path), "--data", str(ds.source), "--out",
                                   str(tmp_path / "cli"), "--max-samples", "8", "--check", "4", "--check-criterion", "rouge"])
    assert out.exit_code == 0, out.output
    assert "(answer loss / token accuracy / ROUGE-L: base " in out.output and "(by rouge)" in out.output


def test_generate_with_check_records_it_and_writes_the_base_when_nothing_beats_it(tiny_bank, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("fruits", 12))
    generate(tiny_bank, data, tmp_path / "checked", max_samples=8, check=4, check_singles=1, check_criterion="loss")
    report = read_report(tmp_path / "checked")
    chk = report.check
    assert chk.examples == 4 and chk.criterion == "loss" and len(chk.candidates) == 6
    assert list(chk.candidates)[:5] == ["base", "x0.5", "x1", "x1.5", "x2"] and list(chk.candidates)[5].startswith("entry:")
    assert chk.chosen == min(chk.candidates, key=lambda k: chk.candidates[k]["loss"])
    assert all(set(v) == {"loss", "accuracy", "exact"} and 0 <= v["exact"] <= 1 for v in chk.candidates.values())
    assert report.scale == pytest.approx(sum(report.coefficients.values()))
    import loramix.pipeline
    from loramix.report import CheckInfo

    zero = {e.name: 0.0 for e in tiny_bank.usable}
    monkeypatch.setattr(loramix.pipeline, "check", lambda *a, **k: CheckInfo(
        4, "loss", {"base": {"loss": 1.0, "accuracy": 0.5, "exact": 0.0}, "x1": {"loss": 2.0, "accuracy": 0.4, "exact": 0.0}},
        "base", False, coefficients=zero))
    runner = CliRunner()
    out = runner.invoke(app, ["generate", "--bank", str(tiny_bank.path), "--data", str(data), "--out", str(tmp_path / "base"),
                              "--max-samples", "8", "--check", "4"])
    assert out.exit_code == 0, out.output
    assert "no composition beat the base model" in out.output
    report = read_report(tmp_path / "base")
    assert not report.check.beats_base and report.scale == 0.0 and set(report.coefficients.values()) == {0.0}
    from safetensors.torch import load_file

    assert all(float(t.abs().max()) == 0.0 for t in load_file(tmp_path / "base" / "adapter_model.safetensors").values())
    assert json.loads((tmp_path / "base" / "adapter_config.json").read_text())["r"] >= 1


def _mean_ratio(bank, coefs, examples=8):
    """The bank's leave-one-out objective by hand: mean over entries of answer loss under coefs[t] / under the base."""
    model, tok = load_model(bank.base_model), load_tokenizer(bank.base_model)
    mixed = MixedLoRA(model, bank, bank.usable)
    ratios = []
    with torch.no_grad():
        for t, e in enumerate(bank.usable):
            fn = answer_loss_fn(model, tok, e.dataset().subsample(examples, 0).samples)
            mixed.weights = torch.zeros(len(bank.usable))
            base = float(fn())
            mixed.weights = torch.as_tensor(coefs[t], dtype=torch.float32)
            ratios.append(float(fn()) / base)
    mixed.remove()
    return float(np.mean(ratios))


def test_answer_trained_operator_starts_at_normalized_and_lowers_the_banks_answer_loss(tiny_bank, tmp_path):
    index = BankIndex(tiny_bank)
    cfg = GenerateConfig(max_samples=8)
    d = index.distance_matrix(index.resolve(cfg.signature_spec()), cfg.distance).copy()
    np.fill_diagonal(d, np.inf)
    data = BankFit(tiny_bank, tiny_bank.usable, d)
    start = AnswerTrained()
    start.epochs = 0
    start.fit_bank(data)
    normalized = np.stack([coefficients(row, "normalized") for row in d])
    assert np.allclose(np.stack([start.coefficients(row) for row in d]), normalized)
    op = AnswerTrained()
    op.epochs = 8
    op.fit_bank(data)
    assert len(op.history) == 8 and all(np.isfinite(op.history))
    trained = np.stack([op.coefficients(row) for row in d])
    assert np.allclose(trained.sum(1), 1) and np.all(np.diag(trained) == 0)
    assert _mean_ratio(tiny_bank, trained) < _mean_ratio(tiny_bank, normalized)
    assert np.allclose(np.stack([AnswerTrained.from_bytes(op.to_bytes()).coefficients(r) for r in d]), trained)


def test_a_stored_calibration_of_another_form_is_not_used(tmp_path):
    """A file that passes its HMAC but holds what this version does not read (an older form) counts as none."""
    from loramix.calibrate import _key, grid
    from loramix.store import store

    bank = Bank(make_bank(tmp_path / "bank", n=3))
    index = BankIndex(bank)
    cfg = GenerateConfig()
    store(index.dir, index.dir / "calibration" / _key(index, cfg, grid()), b'{"an": "older form"}', "json")
    assert cached_calibration(bank, cfg) is None


def test_the_tolerant_rouge_criterion_does_not_trust_one_lucky_example():
    """ROUGE-L within one example's worth of the best (1/16 on 16 examples) is no evidence: those candidates are ranked
    by token accuracy, then loss; a clear ROUGE-L lead still decides."""
    from loramix.runtime.scores import CRITERIA

    tolerant, plain = CRITERIA.get("rouge-tolerant"), CRITERIA.get("rouge")
    lucky = {"base": AnswerScores(2.0, 0.30, 0.0, 0.0), "x1": AnswerScores(1.2, 0.58, 0.0, 0.0),
             "entry:sibling": AnswerScores(1.9, 0.35, 0.0, 1 / 16)}  # one of 16 answers right, by chance
    assert plain.choose(lucky, 16) == "entry:sibling"
    assert tolerant.choose(lucky, 16) == "x1"  # the composition's token accuracy is the better evidence
    clear = {**lucky, "entry:sibling": AnswerScores(1.9, 0.35, 0.0, 3 / 16)}
    assert tolerant.choose(clear, 16) == "entry:sibling"
    assert tolerant.choose({"base": AnswerScores(1.0, 0.5, 0.0, 0.0), "x1": AnswerScores(1.0, 0.5, 0.0, 0.0)}, 16) == "base"


@pytest.mark.parametrize("operator", ["normalized", "neural"])
def test_leave_one_family_out_gives_no_weight_to_the_tasks_family(tmp_path, operator):
    """With groups (the suite's families), each entry is predicted from the other groups' entries only; a trained
    operator is cross-fitted once per group, never on the held-out group."""
    bank = Bank(make_bank(tmp_path / "bank", n=6))
    names = [e.name for e in bank.usable]
    groups = {n: ("a" if i < 2 else "b" if i < 4 else "c") for i, n in enumerate(names)}
    config = GenerateConfig(max_samples=8, operator=operator)
    loo = loo_coefficients(BankIndex(bank), config)
    lofo = loo_coefficients(BankIndex(bank), config, groups=groups)
    same = np.array([[groups[a] == groups[b] for b in names] for a in names])
    assert np.all(lofo[same] == 0) and np.allclose(lofo.sum(1), 1) and np.all(np.diag(loo) == 0)
    assert (loo[same & ~np.eye(6, dtype=bool)] > 0).any()  # leave-one-out still weighs the siblings
