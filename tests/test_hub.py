"""Hub banks, tested offline (HF_HUB_OFFLINE=1) against a local cache laid out as huggingface_hub lays it out:
<cache>/<type>s--<owner>--<name>/{refs/main, blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>}."""

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
from helpers import TINY_SHAPES, topic_records, write_adapter, write_jsonl

from loramix import Bank, LoramixError
from loramix.hub import (_base_adapter, add_adapter, base_model_adapters, lots_of_loras_datasets, pull_base,
                         pull_lots_of_loras, safe_entry_name)

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


SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
LONG = "a-rather-long-organisation-name-here/smol-lora-" + "x" * 86  # a valid hub id, too long as 'owner__name'


@pytest.fixture
def base_cache(hub_cache, tmp_path):
    """The Lots-of-LoRAs cache (Mistral adapters) plus model repos of SMOL adapters: good ones, a DoRA, one of other
    shapes, one whose entry name cannot be made safe, one of another base, and one with only a model card cached."""
    smol = {f"model.layers.{i}.self_attn.{p}": (576 if p == "q_proj" else 192, 576) for i in range(2)
            for p in ("q_proj", "k_proj", "v_proj")}  # SmolLM2-135M's shapes: loramix checks them against its config
    wide = {name: (2 * o, i) for name, (o, i) in TINY_SHAPES.items()}
    repos = {"alice/smol-lora-animals": dict(base=SMOL, seed=20, shapes=smol),
             "bob/Smol-LoRA-colors": dict(base=SMOL + "/", seed=21, shapes=smol),
             "carol/smol-dora": dict(base=SMOL, config_extra={"use_dora": True}, shapes=smol), LONG: dict(base=SMOL, shapes=smol),
             "dave/smol-lora-wide": dict(base=SMOL, shapes=wide), "frank/smol-lora-other": dict(base="other/model")}
    for i, (repo, kw) in enumerate(repos.items()):
        ad = write_adapter(tmp_path / "src" / repo, **kw)
        files = {n: (ad / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
        cache_repo(hub_cache, "model", repo, dict(files, **{"README.md": b"card"}), f"{201 + i:040x}")
    cache_repo(hub_cache, "model", "erin/smol-lora-card-only", {"README.md": b"card"}, f"{300:040x}")
    return hub_cache


def test_lists_a_base_models_adapters_from_the_cache(base_cache):
    assert base_model_adapters(SMOL + "/") == [LONG, "alice/smol-lora-animals", "bob/Smol-LoRA-colors", "carol/smol-dora",
                                               "dave/smol-lora-wide"]
    assert base_model_adapters(MISTRAL) == [f"Lots-of-LoRAs/Mistral-7B-Instruct-v0.2-4b-r16-task{t}" for t in ("081", "1400", "927")]
    assert base_model_adapters(SMOL, filters=["LORA", "o"], limit=2) == [LONG, "alice/smol-lora-animals"]
    assert base_model_adapters(SMOL, filters=["lora", "COLORS"]) == ["bob/Smol-LoRA-colors"]
    assert base_model_adapters("nobody/model") == []


def test_pull_base_refuses_bad_adapters_pins_revisions_and_resumes(tmp_path, base_cache):
    status = pull_base(tmp_path / "bank", SMOL)
    long_name = LONG.replace("/", "__")
    assert list(status) == [long_name, "alice__smol-lora-animals", "bob__Smol-LoRA-colors", "carol__smol-dora",
                            "dave__smol-lora-wide"]
    assert status["alice__smol-lora-animals"] == status["bob__Smol-LoRA-colors"] == "pulled"
    assert status[long_name] == f"refused: {long_name!r} is not a valid bank entry name (ASCII letters, digits, '_', '.', '-', " \
                                "at most 128; no path)"
    assert status["carol__smol-dora"].startswith("refused: carol__smol-dora: adapter_config.json: field 'use_dora' is set: DoRA")
    assert status["dave__smol-lora-wide"] == ("refused: dave__smol-lora-wide: module 'model.layers.0.self_attn.k_proj' is [32, 32] "
                                              f"([out, in]) but base model '{SMOL}' has [192, 576]")
    bank = Bank(tmp_path / "bank")
    assert [e.name for e in bank.entries] == ["alice__smol-lora-animals", "bob__Smol-LoRA-colors"] and bank.base_model == SMOL
    assert not any(e.has_data for e in bank.entries)  # public adapters come without their data
    entry = tmp_path / "bank" / "alice__smol-lora-animals"
    assert sorted(p.name for p in entry.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "source.json"]
    assert json.loads((entry / "source.json").read_text()) == {
        "adapter": "alice/smol-lora-animals", "adapter_revision": f"{201:040x}", "base": SMOL, "listing": f"base_model:adapter:{SMOL}"}
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == ["alice__smol-lora-animals", "bob__Smol-LoRA-colors"]
    again = pull_base(tmp_path / "bank", SMOL, filters=["smol-"])
    assert again["alice__smol-lora-animals"] == again["bob__Smol-LoRA-colors"] == "kept"
    assert again["dave__smol-lora-wide"].startswith("refused: dave__smol-lora-wide: module")  # checked against kept entries


def test_pull_base_filter_and_limit(tmp_path, base_cache):
    """--limit counts the adapters tried after --filter, refused ones included; filters are case-insensitive."""
    status = pull_base(tmp_path / "b1", SMOL, filters=["LoRA"], limit=2)
    assert list(status) == [LONG.replace("/", "__"), "alice__smol-lora-animals"] and status["alice__smol-lora-animals"] == "pulled"
    assert pull_base(tmp_path / "b2", SMOL, filters=["lora", "COLORS"]) == {"bob__Smol-LoRA-colors": "pulled"}
    assert [e.name for e in Bank(tmp_path / "b2").entries] == ["bob__Smol-LoRA-colors"]


def test_pull_base_when_every_adapter_is_refused(tmp_path, base_cache):
    with pytest.raises(LoramixError, match="every adapter was refused .*field 'use_dora' is set"):
        pull_base(tmp_path / "b1", SMOL, filters=["dora"])
    assert not (tmp_path / "b1").exists()
    with pytest.raises(LoramixError, match=f"no adapters of {SMOL} found matching 'nothing'"):
        pull_base(tmp_path / "b1", SMOL, filters=["nothing"])
    with pytest.raises(LoramixError, match="the base model id is empty"):
        pull_base(tmp_path / "b1", "/")
    pull_lots_of_loras(tmp_path / "lol", limit=1)  # a Mistral bank: SMOL adapters cannot join it
    with pytest.raises(LoramixError, match="every adapter was refused .*a bank holds adapters of one base model"):
        pull_base(tmp_path / "lol", SMOL, filters=["alice"])
    assert [p.name for p in (tmp_path / "lol").iterdir()] == ["task081_id_question"]


def test_pull_base_refuses_an_adapter_whose_config_names_another_base(base_cache):
    """Online the hub lists adapters by their model card's tags; the config decides (offline the listing reads it)."""
    with pytest.raises(LoramixError, match="^frank__x: adapter_config.json field 'base_model_name_or_path' is 'other/model', "
                                           f"but it is listed as an adapter of '{SMOL}'$"):
        _base_adapter("frank/smol-lora-other", "frank__x", SMOL)
    folder, samples, source = _base_adapter("bob/Smol-LoRA-colors", "bob", SMOL)  # 'SMOL/' names SMOL
    assert samples is None and source["adapter_revision"] == folder.name == f"{202:040x}"


def test_cli_pull_base(tmp_path, base_cache, capsys, monkeypatch):
    from typer.testing import CliRunner

    from loramix.cli import app, main

    r = CliRunner().invoke(app, ["bank", "pull", "--base", SMOL, "--filter", "lora", "--limit", "3", "--out", str(tmp_path / "bank")])
    assert r.exit_code == 0 and "2 entries, 2 pulled, 0 kept, 1 refused" in r.output, r.output
    assert [e.name for e in Bank(tmp_path / "bank").entries] == ["alice__smol-lora-animals", "bob__Smol-LoRA-colors"]
    for args, message in [(["lots-of-loras", "--base", SMOL], "bank pull takes a COLLECTION or --base MODEL_ID, not both"),
                          ([], "bank pull takes a COLLECTION or --base MODEL_ID"),
                          (["lots-of-loras", "--filter", "x"], "--filter needs --base"),
                          (["--base", SMOL, "--task", "81"], "--task needs a COLLECTION, not --base"),
                          (["--base", ""], "the base model id is empty")]:
        monkeypatch.setattr(sys, "argv", ["loramix", "bank", "pull", *args, "--out", str(tmp_path / "new")])
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 1 and capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "new").exists()


def test_lists_a_base_models_adapters_online(monkeypatch):
    """Online, the hub's listing: a local HTTP server stands in for the hub's /api/models (huggingface_hub runs as it
    is); the hub's order is kept, the filters apply to the ids, and a refused request is one LoramixError."""
    import http.server
    import threading
    from urllib.parse import parse_qs, urlparse

    from huggingface_hub import constants

    queries = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # /api/models only: anything else is a 404
            url = urlparse(self.path)
            queries.append(parse_qs(url.query))
            ok = url.path == "/api/models" and "broken" not in url.query
            body = json.dumps([{"id": i} for i in ("zoe/smol-lora-b", "al/Smol-LoRA-a", "al/smol-x")] if ok else {"error": "bad"})
            self.send_response(200 if ok else 400 if url.path == "/api/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)  # no user-agent probe of the endpoint
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    try:
        assert base_model_adapters(SMOL + "/", filters=["LoRA", "smol"]) == ["zoe/smol-lora-b", "al/Smol-LoRA-a"]
        assert queries[-1]["filter"] == [f"base_model:adapter:{SMOL}"] and queries[-1]["sort"] == ["downloads"]
        assert queries[-1]["search"] == ["lora"]
        assert base_model_adapters(SMOL, limit=1) == ["zoe/smol-lora-b"] and queries[-1]["limit"] == ["1"]
        with pytest.raises(LoramixError, match="^cannot list the adapters of broken/model \\("):
            base_model_adapters("broken/model")
    finally:
        server.shutdown()
        server.server_close()


def test_pull_base_refuses_two_repos_that_name_one_entry(tmp_path, hub_cache):
    """'a/b__c' and 'a__b/c' both make the entry name 'a__b__c': the second was reported 'kept' and never pulled."""
    smol = {f"model.layers.{i}.self_attn.{p}": (576 if p == "q_proj" else 192, 576) for i in range(2)
            for p in ("q_proj", "k_proj", "v_proj")}
    for i, repo in enumerate(("a/b__c", "a__b/c", "zz/good")):
        ad = write_adapter(tmp_path / "src" / repo, base=SMOL, seed=30 + i, shapes=smol)
        cache_repo(hub_cache, "model", repo, {n: (ad / n).read_bytes() for n in ("adapter_config.json",
                                                                                "adapter_model.safetensors")}, f"{400 + i:040x}")
    status = pull_base(tmp_path / "bank", SMOL)
    assert status["zz__good"] == "pulled"
    assert status["a/b__c"] == "refused: its entry name a__b__c is also that of a__b/c"
    assert status["a__b/c"] == "refused: its entry name a__b__c is also that of a/b__c"
    assert [e.name for e in Bank(tmp_path / "bank").entries] == ["zz__good"]
