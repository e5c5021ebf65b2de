import json

import pytest
from helpers import topic_records, write_jsonl
from typer.testing import CliRunner

from loramix.cli import app

runner = CliRunner()


def test_generate_prints_top_entries_and_writes_adapter(tmp_path, bank):
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("numbers", 20, seed=5))
    out = tmp_path / "out"
    r = runner.invoke(app, ["generate", "--bank", str(bank), "--data", str(data), "--out", str(out), "--top-k", "3", "--max-samples", "16", "--check", "0"])
    assert r.exit_code == 0, r.output
    assert "task_numbers" in r.output and "wrote" in r.output
    report = json.loads((out / "loramix.json").read_text())
    assert max(report["coefficients"], key=report["coefficients"].get) == "task_numbers"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()


@pytest.mark.slow
def test_errors_are_one_line_with_nonzero_exit(tmp_path, bank):
    from loramix.cli import main
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "task.jsonl", topic_records("numbers", 5))
    cmd = [sys.executable, "-c", "from loramix.cli import main; main()", "generate", "--bank", str(bank), "--data", str(data),
           "--out", str(tmp_path / "o"), "--distance", "kl"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.strip().startswith("error: distance 'kl' compares tokens signatures, not cloud")
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    p = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True)
    assert p.returncode == 1 and "Traceback" in p.stderr
    assert callable(main)


def test_rank_option(tmp_path, bank):
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("numbers", 5))
    base = ["generate", "--bank", str(bank), "--data", str(data), "--max-samples", "8", "--check", "0"]
    r = runner.invoke(app, base + ["--out", str(tmp_path / "full"), "--rank", "full"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "full" / "adapter_config.json").read_text())["r"] == 32  # 8 entries x rank 4
    r = runner.invoke(app, base + ["--out", str(tmp_path / "x"), "--rank", "half"])
    assert r.exit_code != 0


def test_bank_index_and_list(tmp_path, bank):
    (bank / "task_colors" / "train.jsonl").unlink()
    r = runner.invoke(app, ["bank", "list", str(bank)])
    assert r.exit_code == 0, r.output
    assert "task_animals" in r.output and "missing" in r.output and "no data" in r.output and "q_proj" in r.output
    # (the entry without data is left out: with the default --entry-signatures auto it would answer the probe prompts
    # on the base model, which this bank's 'tiny-base' is not; tests/test_probes.py covers that)
    r = runner.invoke(app, ["bank", "index", str(bank), "--max-samples", "8", "--distance", "w2", "--fit", "neural",
                            "--entry-signatures", "data"])
    assert r.exit_code == 0, r.output
    assert "7 signatures (embed-io)" in r.output and "7 computed" in r.output and "operator neural fitted" in r.output
    r = runner.invoke(app, ["bank", "index", str(bank), "--max-samples", "8", "--entry-signatures", "data"])
    assert "0 computed, 7 cached" in r.output
    r = runner.invoke(app, ["bank", "list", str(bank), "--max-samples", "8"])
    assert "cached" in r.output


def test_version():
    r = runner.invoke(app, ["version"])
    assert r.exit_code == 0 and r.output.strip()


def test_bank_index_fit_refuses_what_it_cannot_fit(bank):
    r = runner.invoke(app, ["bank", "index", str(bank), "--fit", "neural"])
    assert r.exit_code != 0 and "--fit needs --distance" in str(r.exception)
    r = runner.invoke(app, ["bank", "index", str(bank), "--distance", "w2", "--fit", "normalized"])
    assert r.exit_code != 0 and "operator 'normalized' is not trained" in str(r.exception)
    assert "(trainable: neural, neural-answer)" in str(r.exception)
