"""Hub banks, tested offline (HF_HUB_OFFLINE=1) against a local cache laid out as huggingface_hub lays it out:
<cache>/<type>s--<owner>--<name>/{refs/main, blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>}."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from helpers import topic_records, write_adapter, write_jsonl

from loramix import Bank, LoramixError
from loramix.hub import add_adapter, lots_of_loras_datasets, pull_lots_of_loras, safe_entry_name

MISTRAL = "mistralai/Mistral-7B-Instruct-v0.2"


def cache_repo(cache: Path, repo_type: str, repo_id: str, files: dict[str, bytes], commit: str) -> None:
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for rel, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)


def parquet_bytes(records: list[dict], tmp: Path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp / "x.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    return path.read_bytes()


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    for i, (task, slug, topic) in enumerate([("task081", "id_question", "animals"), ("task1400", "obqa_answer", "colors"),
                                               ("task927", "yelp_sentiment", "tools")]):
        ad = write_adapter(tmp_path / "src" / task, base=MISTRAL, seed=i)
        files = {n: (ad / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
        files["README.md"] = b"model card"
        cache_repo(cache, "model", f"Lots-of-LoRAs/Mistral-7B-Instruct-v0.2-4b-r16-{task}", files, f"{i + 1:040x}")
        recs = [dict(r, id=f"{task}-{j}") for j, r in enumerate(topic_records(topic, 12, seed=i))]
        data = {"data/train-00000-of-00001.parquet": parquet_bytes(recs[:10], tmp_path),
                "data/test-00000-of-00001.parquet": parquet_bytes(recs[10:], tmp_path)}
        cache_repo(cache, "dataset", f"Lots-of-LoRAs/{task}_{slug}", data, f"{i + 101:040x}")
    cache_repo(cache, "dataset", "someone/else", {"x.json": b"[]"}, "f" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_lists_the_collection_from_the_cache(hub_cache):
    assert lots_of_loras_datasets() == {"task081": "Lots-of-LoRAs/task081_id_question",
                                        "task927": "Lots-of-LoRAs/task927_yelp_sentiment",
                                        "task1400": "Lots-of-LoRAs/task1400_obqa_answer"}


def test_pull_writes_a_bank_with_pinned_revisions_and_resumes(tmp_path, hub_cache):
    status = pull_lots_of_loras(tmp_path / "bank", limit=2)
    assert status == {"task081_id_question": "pulled", "task927_yelp_sentiment": "pulled"}
    bank = Bank(tmp_path / "bank")
    assert bank.base_model == MISTRAL and [e.name for e in bank.usable] == list(status)
    src = json.loads((tmp_path / "bank" / "task081_id_question" / "source.json").read_text())
    assert src == {"adapter": "Lots-of-LoRAs/Mistral-7B-Instruct-v0.2-4b-r16-task081", "adapter_revision": f"{1:040x}",
                   "dataset": "Lots-of-LoRAs/task081_id_question", "dataset_revision": f"{101:040x}", "split": "train"}
    rows = [json.loads(x) for x in (tmp_path / "bank" / "task081_id_question" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and isinstance(rows[0]["output"], list)
    assert not (tmp_path / "bank" / "task081_id_question" / "README.md").exists()
    again = pull_lots_of_loras(tmp_path / "bank", tasks=["81", "task1400"])  # 81, 081 and task81 name task081
    assert again == {"task081_id_question": "kept", "task1400_obqa_answer": "pulled"}
    assert pull_lots_of_loras(tmp_path / "bank", tasks=["task81", "081"]) == {"task081_id_question": "kept"}
    with pytest.raises(LoramixError, match="no Lots-of-LoRAs dataset for task5"):
        pull_lots_of_loras(tmp_path / "bank", tasks=["5"])


def test_add_local_and_hub_adapters(tmp_path, hub_cache):
    bank = tmp_path / "bank"
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("music", 5))
    add_adapter(bank, str(write_adapter(tmp_path / "mine", base=MISTRAL, seed=9)), data)
    add_adapter(bank, "Lots-of-LoRAs/Mistral-7B-Instruct-v0.2-4b-r16-task927", data, name="yelp")
    b = Bank(bank)
    assert [e.name for e in b.usable] == ["mine", "yelp"]
    assert json.loads((bank / "yelp" / "source.json").read_text())["adapter_revision"] == f"{3:040x}"
    with pytest.raises(LoramixError, match="already has an entry 'mine'"):
        add_adapter(bank, str(tmp_path / "mine"), data)
    with pytest.raises(LoramixError, match="one base model"):
        add_adapter(bank, str(write_adapter(tmp_path / "other", base="other/model")), data)
    assert not (bank / "other").exists()
    with pytest.raises(LoramixError, match="not a valid bank entry name"):
        add_adapter(bank, str(tmp_path / "mine"), data, name="../escape")
    with pytest.raises(LoramixError, match="cannot download"):
        add_adapter(bank, "nobody/missing-adapter", data)


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "..", "", "x" * 200, "a\\b"])
def test_entry_names_cannot_escape(name):
    with pytest.raises(LoramixError):
        safe_entry_name(name)


def test_cli_pull_and_add(tmp_path, hub_cache):
    from typer.testing import CliRunner

    from loramix.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["bank", "pull", "lots-of-loras", "--out", str(tmp_path / "bank"), "--task", "927"])
    assert r.exit_code == 0 and "1 pulled" in r.output, r.output
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("music", 5))
    r = runner.invoke(app, ["bank", "add", str(tmp_path / "bank"), str(write_adapter(tmp_path / "x", base=MISTRAL)), "--data", str(data)])
    assert r.exit_code == 0 and len(Bank(tmp_path / "bank").usable) == 2, r.output


def test_pull_refuses_a_task_whose_data_generate_would_refuse(tmp_path, hub_cache):
    """Integer outputs in one task's parquet: that task is refused, with the reason; the others are pulled."""
    ad = write_adapter(tmp_path / "src" / "task5", base=MISTRAL, seed=5)
    cache_repo(hub_cache, "model", "Lots-of-LoRAs/Mistral-7B-Instruct-v0.2-4b-r16-task5",
               {n: (ad / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}, f"{9:040x}")
    bad = [{"input": f"q{i}", "output": i} for i in range(4)]
    cache_repo(hub_cache, "dataset", "Lots-of-LoRAs/task5_numbers",
               {"data/train-00000-of-00001.parquet": parquet_bytes(bad, tmp_path)}, f"{99:040x}")
    status = pull_lots_of_loras(tmp_path / "bank", tasks=["5", "927"])
    assert status["task927_yelp_sentiment"] == "pulled"
    assert status["task5_numbers"].startswith("refused: Lots-of-LoRAs/task5_numbers: train-00000-of-00001.parquet[0]: "
                                              "field 'output' must be a string")
    assert not (tmp_path / "bank" / "task5_numbers").exists() and [e.name for e in Bank(tmp_path / "bank").entries] == [
        "task927_yelp_sentiment"]
    with pytest.raises(LoramixError, match="every task was refused"):
        pull_lots_of_loras(tmp_path / "bank2", tasks=["5"])
    assert not (tmp_path / "bank2").exists()
