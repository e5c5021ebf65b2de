"""The Ray engine against a real local Ray cluster (2 CPUs): the same signatures, coefficients and adapters as the
local engine, and a run that loses a worker is completed by a rerun."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import at_threads, make_bank, topic_records, write_jsonl

pytest.importorskip("ray")

from loramix import Bank, BankIndex, SignatureSpec, generate, make_signer, read_report  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray cluster

CLI = [sys.executable, "-c", "from loramix.cli import main; main()"]
SPEC = SignatureSpec("embed", max_samples=8)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`ray start --head` with 2 CPUs; RAY_ADDRESS points every engine (and CLI subprocess) at it.

    Token authentication is switched off explicitly, for the cluster and its clients alike: left unset, Ray turns
    it on for `ray start` whenever ~/.ray/auth_token exists (any earlier local `ray.init()` writes one), while this
    test process read its Ray settings when it imported ray, before the fixture ran, and would connect without
    a token and be refused."""
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    tmp = tmp_path_factory.mktemp("ray")
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = [ray_bin, "start", "--head", "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard", "false",
             "--object-store-memory", str(200 * 2**20), "--port", "0", "--temp-dir", str(tmp)]
    out = subprocess.run(start, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    address = next(line.split("'")[1] for line in (out.stdout + out.stderr).splitlines() if "ray.init(address=" in line or "address='" in line)
    os.environ["RAY_ADDRESS"] = address
    yield address
    import ray

    ray.shutdown()
    subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_index_and_generate_match_the_local_engine(cluster, tmp_path):
    local_bank = make_bank(tmp_path / "local", n=6)
    ray_bank = make_bank(tmp_path / "ray", n=6)
    local = BankIndex(Bank(local_bank)).signatures(SPEC)
    remote = BankIndex(Bank(ray_bank)).signatures(SPEC, engine="ray")
    assert all(np.array_equal(a, b) for a, b in zip(local, remote))
    signer = make_signer(SPEC.resolved(None))  # and the same bytes at any thread count of this process
    for threads in (1, 2, 3):
        sigs = at_threads(threads, lambda: [signer(e.dataset()) for e in Bank(local_bank).usable])
        assert all(np.array_equal(a, b) for a, b in zip(sigs, remote)), threads
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("fruits", 10))
    generate(local_bank, data, tmp_path / "a", max_samples=8, check=0)
    generate(ray_bank, data, tmp_path / "b", max_samples=8, check=0)
    assert read_report(tmp_path / "a").coefficients == read_report(tmp_path / "b").coefficients
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_bank_build_on_ray_matches_local(cluster, tmp_path, tiny_base):
    from loramix.build import build_bank
    from loramix.train import TrainConfig

    suite = tmp_path / "suite"
    for topic in ("colors", "tools", "music"):
        (suite / f"t_{topic}").mkdir(parents=True)
        write_jsonl(suite / f"t_{topic}" / "train.jsonl", topic_records(topic, 8))
    cfg = TrainConfig(steps=4, batch_size=4, rank=2, alpha=4, bf16=False)
    # as a 1-CPU Ray worker: training runs multi-threaded ops, so its float sums depend on the thread count
    at_threads(1, lambda: build_bank(suite, tmp_path / "local", exclude=(), config=cfg, base=str(tiny_base)))
    status = build_bank(suite, tmp_path / "ray", exclude=(), config=cfg, base=str(tiny_base), engine="ray")
    assert status == {"t_colors": "trained", "t_music": "trained", "t_tools": "trained"}
    for t in status:
        assert (tmp_path / "local" / t / "adapter_model.safetensors").read_bytes() == (tmp_path / "ray" / t / "adapter_model.safetensors").read_bytes()
        assert (tmp_path / "ray" / t / "train.jsonl").is_file()
    assert set(build_bank(suite, tmp_path / "ray", exclude=(), config=cfg, base=str(tiny_base), engine="ray").values()) == {"kept"}


def test_a_lost_worker_is_completed_by_a_rerun(cluster, tmp_path):
    bank = make_bank(tmp_path / "bank", n=10)
    env = {**os.environ, "LORAMIX_PROGRESS": "0", "RAY_ADDRESS": cluster}
    args = ["bank", "index", str(bank), "--max-samples", "8", "--engine", "ray"]
    proc = subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    killed = False
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        cached = sum(BankIndex(Bank(bank)).status(SPEC).values())
        workers = subprocess.run(["pgrep", "-f", "ray::_Worker"], capture_output=True, text=True).stdout.split()
        if not killed and cached >= 1 and workers:
            os.kill(int(workers[0]), signal.SIGKILL)
            killed = True
        time.sleep(0.2)
    proc.wait(timeout=120)
    assert killed or proc.returncode == 0
    if proc.returncode != 0:
        assert "were lost with their Ray workers" in proc.stderr.read().decode()
    rerun = subprocess.run(CLI + args, capture_output=True, env=env)
    assert rerun.returncode == 0, rerun.stderr.decode()
    got = BankIndex(Bank(bank)).signatures(SPEC)
    want = BankIndex(Bank(make_bank(tmp_path / "fresh", n=10))).signatures(SPEC)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_probe_answers_on_ray_match_the_local_engine(cluster, tmp_path):
    """Entries without data answer the probe prompts on Ray workers, each loading the base once (here the default
    base's GGUF on llama.cpp): the same answers as the local engine, each stored as soon as it is known."""
    from loramix.probes import ProbeSet

    probes = ProbeSet(max_samples=6)
    answers = {}
    for engine in ("local", "ray"):
        bank = tmp_path / engine
        for name in ("numbers_french", "countries_alpha3", "morphology_plural"):
            shutil.copytree(Bank("default").entry(name).adapter.path, bank / name, ignore=shutil.ignore_patterns("train.jsonl"))
        index = BankIndex(Bank(bank))
        answers[engine] = [d.samples for d in index.probe_datasets(probes, runtime="llama.cpp", engine=engine)]
        assert len(list((index.dir / "probes").rglob("*.json"))) == 3
    assert answers["local"] == answers["ray"] and all(len(a) == len(probes.prompts) for a in answers["ray"])
