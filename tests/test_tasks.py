"""The task suite builder: registry, file parsers (on tiny synthetic files in the real formats), every installed
family's tasks built and checked, determinism, reserved data, CLI."""

from __future__ import annotations

import gzip
import json
import random
import re
import unicodedata
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loramix.cli import app
from loramix.data import read_dataset
from loramix.errors import LoramixError
from loramix.tasks import CAP, FAMILIES, SPLITS, SUITE, TASKS, build_suite, build_task, core, freedict, wordnet

SMALL_SOURCES = {  # tasks whose source has fewer than 300 items
    "countries_capital", "countries_region", "countries_subregion", "countries_demonym", "countries_calling_code",
    "countries_capital_to_country", "countries_alpha2", "countries_alpha3", "countries_language", "tabular_iris", "tabular_wine",
}
RESERVED = ("currenc", "meronym", "holonym", "superlative")
RESERVED_RE = re.compile(r"\b(currenc\w*|meronym|holonym|superlative|dollars?|euros?)\b", re.IGNORECASE)


def family_tasks(family: str) -> list[str]:
    return [n for n in SUITE if TASKS.get(n).family == family]


# ---------------------------------------------------------------- registry and rules


def test_registry_has_enough_tasks_and_families():
    assert len(SUITE) >= 46 and len(FAMILIES) >= 8
    assert len(set(SUITE)) == len(SUITE)
    for name in SUITE:
        spec = TASKS.get(name)
        assert core.NAME_RE.fullmatch(name) and name.startswith(spec.family + "_")
        assert spec.definition.endswith(".") and "\n" not in spec.definition
        assert spec.source and spec.license and spec.needs is not None


def test_no_task_names_reserved_data():
    for name in SUITE:
        spec = TASKS.get(name)
        text = " ".join([name, spec.definition, spec.source, spec.license]).lower()
        assert not any(w in text for w in RESERVED), name
    assert freedict.DIRECTIONS == ("eng-fra", "fra-eng", "eng-deu", "deu-eng", "eng-spa", "spa-eng")
    assert set(wordnet.KEPT_POINTERS) == {"@", "!", "\\"}  # no meronym (%) or holonym (#) pointers


def test_clean_merges_filters_and_sorts():
    pairs = [
        ("b  input", ["x", "y"]),
        ("a", "t"),
        ("b input", ["z", "x"]),  # same input after whitespace: merged, first target kept
        ("c", ["costs 5 €"]),  # currency sign in the target: dropped
        ("d", ["", "alt"]),  # empty target: dropped
        ("e", ["ok", "bad €"]),  # bad alternative: dropped, the pair kept
        ("f " * 81, "long input"),
        ("g", "w " * 21),
        ("the currency of Peru", "sol"),
        ("dollar", "dólar"),
    ]
    got = core.clean(pairs)
    assert [(s.input, s.outputs) for s in got] == [("a", ("t",)), ("b input", ("x", "y", "z")), ("e", ("ok",))]
    assert [s.input for s in core.clean([("costs 5 € or 6 dollars", "x"), ("a currency", "y")], prose=True)] == ["costs 5 € or 6 dollars"]
    assert core.split_counts(600) == {"train": 480, "valid": 60, "test": 60}
    assert core.split_counts(149) == {"train": 119, "valid": 15, "test": 15}


def test_missing_sources_are_one_line_errors(monkeypatch, tmp_path):
    assert core.pypi("no_such_module_xyz", "no-such-package").missing() == "needs the Python package no-such-package: pip install no-such-package"
    monkeypatch.setattr(wordnet, "WORDNET_DIR", tmp_path / "absent")
    assert TASKS.get("wordnet_synonym").missing() == ["needs the Debian package wordnet-base: apt-get install wordnet-base"]
    with pytest.raises(LoramixError, match="apt-get install wordnet-base"):
        build_task("wordnet_synonym")
    monkeypatch.setattr(freedict, "DICTD_DIR", tmp_path / "absent")
    with pytest.raises(LoramixError, match="apt-get install dict-freedict-eng-fra"):
        build_task("freedict_eng_fra")
    report = build_suite(tmp_path / "out", only=["wordnet_antonym", "freedict_spa_eng"])
    assert report.built == [] and set(report.skipped) == {"wordnet_antonym", "freedict_spa_eng"}
    with pytest.raises(LoramixError, match="unknown task 'nope'"):
        build_suite(tmp_path / "out", only=["nope"])


# ---------------------------------------------------------------- WordNet parser, on synthetic files

WN_HEADER = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2 Princeton University  \n"
WN_DATA = {
    "noun": [
        "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 004 @ 02083346 n 0000 #m 02083863 n 0000 "
        "%p 02158846 n 0000 ~ 02085374 n 0000 | a member of the genus Canis; occurs in many breeds; \"the dog barked\"  ",
        "02083346 05 n 02 canine 0 canid 0 001 ~ 02084071 n 0000 | any of various fleshy-footed carnivorous mammals  ",
        "09999999 27 n 01 atom 0 000 | (physics and chemistry) the smallest component of an element  ",
    ],
    "verb": ["01926311 38 v 01 run 0 001 @ 01835496 v 0000 01 + 02 00 | move fast by using one's feet; \"Don't run!\"  "],
    "adj": [
        "01247240 00 a 01 hot 0 001 ! 01251128 a 0101 | used of physical heat; \"a hot stove\"  ",
        "01251128 00 a 01 cold 0 001 ! 01247240 a 0101 | used of physical coldness  ",
        "02793898 01 a 01 atomic 0 001 \\ 09999999 n 0101 | of or relating to or comprising atoms  ",
        "00013160 00 s 01 galore(ip) 0 000 | in great numbers  ",
    ],
    "adv": ["00085811 02 r 01 quickly 0 000 | with speed  "],
}
WN_INDEX = {
    "noun": ["atom n 1 0 1 1 09999999  ", "canine n 1 1 ~ 1 0 02083346  ", "dog n 1 3 @ #m ~ 1 1 02084071  "],
    "verb": ["run v 1 1 @ 1 1 01926311  "],
    "adj": ["atomic a 1 1 \\ 1 1 02793898  ", "cold a 1 1 ! 1 1 01251128  ", "galore a 1 0 1 0 00013160  ",
            "hot a 1 1 ! 1 1 01247240  "],
    "adv": ["quickly r 1 0 1 1 00085811  "],
}


@pytest.fixture
def mini_wordnet(tmp_path, monkeypatch):
    for name in wordnet.POS_FILES.values():
        (tmp_path / f"data.{name}").write_text(WN_HEADER + "\n".join(WN_DATA[name]) + "\n")
        (tmp_path / f"index.{name}").write_text(WN_HEADER + "\n".join(WN_INDEX[name]) + "\n")
    (tmp_path / "lexnames").write_text("00\tadj.all\t3\n01\tadj.pert\t3\n05\tnoun.animal\t1\n27\tnoun.substance\t1\n")
    monkeypatch.setattr(wordnet, "WORDNET_DIR", tmp_path)
    return tmp_path


def test_wordnet_parser(mini_wordnet):
    wn = wordnet.read_wordnet(mini_wordnet)
    dog = wn.synsets["n", 2084071]
    assert dog.words == ("dog", "domestic dog", "Canis familiaris") and dog.lexname == 5
    assert dog.pointers == (("@", "n", 2083346, 0, 0),)  # meronym, holonym, hyponym pointers dropped
    assert wordnet.short_gloss(dog.gloss) == "a member of the genus Canis"
    assert wn.synsets["a", 13160].words == ("galore",) and wn.synsets["a", 13160].pos == "a"
    assert wn.synsets["v", 1926311].related("@") == [("v", 1835496, 0, 0)]  # verb frames after the pointers
    assert wn.index["n"]["dog"] == wordnet.Lemma("dog", "n", (2084071,), 1)
    assert [e.lemma for e in wn.common("n")] == ["atom", "dog"] and wn.lexnames[5] == "noun.animal"
    assert all(p[0] in wordnet.KEPT_POINTERS for s in wn.synsets.values() for p in s.pointers)


def pairs(name: str) -> list[tuple[str, list[str]]]:
    """The task's builder output, sorted, outputs as lists."""
    return sorted((i, [o] if isinstance(o, str) else list(o)) for i, o in TASKS.get(name).make(random.Random(0)))


def test_wordnet_builders_on_synthetic_files(mini_wordnet):
    assert pairs("wordnet_antonym") == [("cold", ["hot"]), ("hot", ["cold"])]
    assert pairs("wordnet_pertainym") == [("atomic", ["atom"])]
    assert pairs("wordnet_hypernym") == [("dog", ["canine", "canid"])]
    assert pairs("wordnet_synonym") == [("dog", ["domestic dog", "Canis familiaris"])]
    assert pairs("wordnet_lexical_category") == [("atom", ["substance"]), ("dog", ["animal"])]
    assert pairs("wordnet_part_of_speech") == [("atom", ["noun"]), ("atomic", ["adjective"]), ("cold", ["adjective"]),
                                               ("dog", ["noun"]), ("hot", ["adjective"]), ("quickly", ["adverb"]), ("run", ["verb"])]
    assert pairs("wordnet_noun_definition") == [("atom", ["(physics and chemistry) the smallest component of an element"]),
                                                ("dog", ["a member of the genus Canis"])]


# ---------------------------------------------------------------- dictd parser, on synthetic files

def b64_digits(n: int) -> str:
    digits = ""
    while True:
        digits = freedict.B64[n % 64] + digits
        n //= 64
        if not n:
            return digits


@pytest.fixture
def mini_dictd(tmp_path, monkeypatch):
    entries = [
        ("00databaseinfo", "00-database-info\nA tiny test dictionary.\n"),
        ("cat", "cat /kæt/\n1. chat <n, masc>\n2. matou [zool.]\n   Synonym: {kitty}\n"),
        ("cat", "cat /kæt/ <v>\nfouetter\n"),
        ("happiest", "happiest /ˈhæpiɪst/\nle plus heureux\n"),
        ("ice cream", "ice cream\nglace\n"),
        ("run", "run /rʌn/\ncourir, fuir (vite)\n      \"he runs\" - il court\n see: {ran}\n"),
    ]
    text, index = b"", []
    for head, body in entries:
        data = body.encode()
        index.append(f"{head}\t{b64_digits(len(text))}\t{b64_digits(len(data))}")
        text += data
    (tmp_path / "freedict-eng-fra.index").write_text("\n".join(index) + "\n", encoding="utf-8")
    (tmp_path / "freedict-eng-fra.dict.dz").write_bytes(gzip.compress(text))
    monkeypatch.setattr(freedict, "DICTD_DIR", tmp_path)
    freedict._read_cached.cache_clear()
    yield tmp_path
    freedict._read_cached.cache_clear()


def test_dictd_parser(mini_dictd):
    assert [freedict.b64_number(d) for d in ("A", "B", "BA", "/", "BAA")] == [0, 1, 64, 63, 4096]
    assert freedict.b64_number(b64_digits(123456)) == 123456
    d = freedict.Dictionary.read(mini_dictd / "freedict-eng-fra.index", mini_dictd / "freedict-eng-fra.dict.dz")
    assert [d.headword(i) for i in range(len(d.lines))] == ["cat", "cat", "happiest", "ice cream", "run"]  # metadata skipped
    assert d.entries(1) == d.entries(0) and len(d.entries(0)) == 2
    assert freedict.parse_entry(d.entry(0)) == ("cat", ["chat", "matou"])
    assert freedict.parse_entry(d.entry(4)) == ("run", ["courir", "fuir"])


def test_freedict_builder_on_synthetic_files(mini_dictd):
    assert pairs("freedict_eng_fra") == [("cat", ["chat", "matou", "fouetter"]), ("run", ["courir", "fuir"])]  # no superlative
    with pytest.raises(ValueError):
        freedict.dictionary("eng-ita")  # reserved


# ---------------------------------------------------------------- every installed family, built once


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    return out, build_suite(out)


def check_task(folder: Path, name: str) -> None:
    doc = json.loads((folder / "task.json").read_text(encoding="utf-8"))
    spec = TASKS.get(name)
    assert list(doc) == ["Definition", "Source", "Categories", "License", "Instances", "Splits"]
    assert doc["Definition"] == [spec.definition] and doc["Categories"] == [spec.family] and doc["Source"] == [spec.source]
    instances = doc["Instances"]
    n = len(instances)
    assert n <= CAP and (n >= 300 or name in SMALL_SOURCES), (name, n)
    ids = [i["id"] for i in instances]
    assert ids == [f"{name}-{k}" for k in range(n)]
    inputs = [i["input"] for i in instances]
    assert len(set(inputs)) == n, "inputs are deduplicated"
    for i in instances:
        assert i["input"].strip() and len(i["input"].split()) <= core.MAX_INPUT_WORDS
        assert i["output"] and all(isinstance(o, str) and o.strip() for o in i["output"])
        assert len(i["output"][0].split()) <= core.MAX_OUTPUT_WORDS
        assert not any(unicodedata.category(c) == "Sc" for o in i["output"] for c in o)
        assert not any(RESERVED_RE.search(o) for o in i["output"]), i["output"]
    splits = doc["Splits"]
    assert list(splits) == list(SPLITS)
    assert sorted(sum(splits.values(), [])) == sorted(ids), "splits are disjoint and cover the instances"
    assert {s: len(v) for s, v in splits.items()} == core.split_counts(n)
    by_id = {i["id"]: i for i in instances}
    for split in SPLITS:
        lines = (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
        records = [json.loads(x) for x in lines]
        assert records == [{"input": f"{spec.definition}\n\n{by_id[k]['input']}", "output": by_id[k]["output"]} for k in splits[split]]
    assert read_dataset(folder / "task.json").samples[0].input.startswith(spec.definition + "\n\n")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_family_builds(family, suite):
    out, report = suite
    names = family_tasks(family)
    skipped = {n: report.skipped[n] for n in names if n in report.skipped}
    if skipped:
        pytest.skip(f"{family}: source not installed: {next(iter(skipped.values()))}")
    summary = {e["name"]: e for e in json.loads((out / "suite.json").read_text(encoding="utf-8"))}
    for name in names:
        check_task(out / name, name)
        assert summary[name]["family"] == family and sum(summary[name]["counts"].values()) > 0
        if family == "symbols":
            doc = json.loads((out / name / "task.json").read_text(encoding="utf-8"))
            assert not any(unicodedata.category(c) == "Sc" for i in doc["Instances"] for c in i["input"])


@pytest.mark.slow
def test_suite_json_and_report(suite):
    out, report = suite
    entries = json.loads((out / "suite.json").read_text(encoding="utf-8"))
    assert [e["name"] for e in entries] == [e["name"] for e in report.built] == [n for n in SUITE if n not in report.skipped]
    assert all(list(e) == ["name", "family", "definition", "source", "license", "counts"] for e in entries)
    assert not set(report.skipped) & {e["name"] for e in entries}


@pytest.mark.slow
def test_rebuild_is_byte_identical(suite, tmp_path):
    out, report = suite
    names = [e["name"] for e in report.built][:1] + ["numbers_roman", "wordnet_antonym", "freedict_eng_fra"]
    names = [n for n in dict.fromkeys(names) if n not in report.skipped]
    if not names:
        pytest.skip("no source installed")
    build_suite(tmp_path, only=names)
    for name in names:
        for f in ("task.json", "train.jsonl", "valid.jsonl", "test.jsonl"):
            assert (tmp_path / name / f).read_bytes() == (out / name / f).read_bytes(), (name, f)
    other = build_suite(tmp_path / "seed1", only=names[:1], seed=1)
    if other.built:
        assert (tmp_path / "seed1" / names[0] / "task.json").read_bytes() != (out / names[0] / "task.json").read_bytes()


# ---------------------------------------------------------------- CLI

runner = CliRunner()


def test_cli_list_and_build(tmp_path, monkeypatch):
    r = runner.invoke(app, ["tasks", "list"])
    assert r.exit_code == 0 and "tasks" in r.output
    pytest.importorskip("roman", reason="needs the Python package roman")
    r = runner.invoke(app, ["tasks", "build", "--out", str(tmp_path), "--only", "numbers_roman"])
    assert r.exit_code == 0, r.output
    assert "numbers_roman" in r.output and (tmp_path / "numbers_roman" / "train.jsonl").is_file()
    monkeypatch.setattr(wordnet, "WORDNET_DIR", tmp_path / "absent")
    r = runner.invoke(app, ["tasks", "build", "--out", str(tmp_path), "--only", "wordnet_antonym"])
    assert r.exit_code != 0 and isinstance(r.exception, LoramixError) and "wordnet_antonym" in str(r.exception)
