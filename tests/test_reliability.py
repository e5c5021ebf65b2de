"""Interrupted and concurrent runs: a real `loramix` process killed at any moment leaves the previous state
intact and the next run correct; two runs writing one output or one index do not corrupt each other."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_bank, topic_records, write_jsonl

from loramix import Bank, BankIndex, SignatureSpec

pytestmark = pytest.mark.slow  # loramix processes, killed and raced

CLI = [sys.executable, "-c", "from loramix.cli import main; main()"]


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "LORAMIX_PROGRESS": "0"}
    return subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)


def kill_after(proc: subprocess.Popen, seconds: float) -> None:
    time.sleep(seconds)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("delay", [1.0, 3.0])
def test_killed_generate_keeps_previous_output_and_next_run_is_correct(tmp_path, delay):
    bank = make_bank(tmp_path / "bank", n=6)
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("fruits", 12))
    old = write_jsonl(tmp_path / "old.jsonl", topic_records("tools", 12))
    out = tmp_path / "out"
    args = ["generate", "--bank", str(bank), "--out", str(out), "--max-samples", "8", "--force", "--check", "0"]
    assert subprocess.run(CLI + args + ["--data", str(old)], capture_output=True).returncode == 0
    previous = files(out)
    proc = start(args + ["--data", str(data)])
    kill_after(proc, delay)
    now = files(out)
    for p in (bank / ".loramix").rglob("*.npy"):  # every cached array that is visible is complete
        assert not p.name.startswith(".")
    reference = tmp_path / "reference"
    assert subprocess.run(CLI + ["generate", "--bank", str(bank), "--out", str(reference), "--max-samples", "8", "--check", "0",
                                 "--data", str(data)], capture_output=True).returncode == 0
    # either untouched, or the new output whole (the kill came after it was renamed into place)
    weights = "adapter_model.safetensors"
    assert now == previous or (proc.returncode in (0, -9) and now[weights] == files(reference)[weights]), proc.returncode
    assert subprocess.run(CLI + args + ["--data", str(data)], capture_output=True).returncode == 0
    assert files(out)["adapter_model.safetensors"] == files(reference)["adapter_model.safetensors"]


def test_killed_bank_index_is_completed_by_the_next_run(tmp_path):
    bank = make_bank(tmp_path / "bank", n=8)
    proc = start(["bank", "index", str(bank), "--max-samples", "16"])
    kill_after(proc, 3.0)
    done = sum(BankIndex(Bank(bank)).status(SignatureSpec(max_samples=16)).values())
    assert subprocess.run(CLI + ["bank", "index", str(bank), "--max-samples", "16"], capture_output=True).returncode == 0
    sigs = BankIndex(Bank(bank)).signatures(SignatureSpec(max_samples=16))
    fresh = make_bank(tmp_path / "fresh", n=8)
    want = BankIndex(Bank(fresh)).signatures(SignatureSpec(max_samples=16))
    assert all((a == b).all() for a, b in zip(sigs, want))
    assert 0 <= done <= 8


def test_killed_bank_build_is_resumed(tmp_path, tiny_base):
    suite = tmp_path / "suite"
    for topic in ("colors", "tools", "music", "sports"):
        (suite / f"t_{topic}").mkdir(parents=True)
        write_jsonl(suite / f"t_{topic}" / "train.jsonl", topic_records(topic, 8))
    args = ["bank", "build", "--suite", str(suite), "--out", str(tmp_path / "bank"), "--base", str(tiny_base), "--steps", "40", "--rank", "2"]
    proc = start(args)
    kill_after(proc, 6.0)
    assert subprocess.run(CLI + args, capture_output=True).returncode == 0
    bank = Bank(tmp_path / "bank")
    assert [e.name for e in bank.usable] == ["t_colors", "t_music", "t_sports", "t_tools"]


def test_two_generates_on_one_output(tmp_path):
    bank = make_bank(tmp_path / "bank", n=4)
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("fruits", 8))
    out = tmp_path / "out"
    args = ["generate", "--bank", str(bank), "--data", str(data), "--out", str(out), "--max-samples", "8", "--check", "0"]
    subprocess.run(CLI + ["bank", "index", str(bank), "--max-samples", "8"], capture_output=True)
    procs = [start(args) for _ in range(2)]
    results = [(p.wait(), p.stderr.read().decode()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    # refused at the start (the winner had written it) or at the end (both ran at once: the first rename wins)
    assert ("already exists" in loser or "another run wrote it at the same time" in loser), loser
    assert len(loser.strip().splitlines()) == 1
    assert set(files(out)) == {"adapter_config.json", "adapter_model.safetensors", "loramix.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_two_bank_index_runs_at_once(tmp_path):
    bank = make_bank(tmp_path / "bank", n=6)
    procs = [start(["bank", "index", str(bank), "--max-samples", "8"]) for _ in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    index = BankIndex(Bank(bank))
    assert all(index.status(SignatureSpec(max_samples=8)).values())
    fresh = BankIndex(Bank(make_bank(tmp_path / "fresh", n=6))).signatures(SignatureSpec(max_samples=8))
    assert all((a == b).all() for a, b in zip(index.signatures(SignatureSpec(max_samples=8)), fresh))
