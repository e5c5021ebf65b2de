import json

import pytest

from loramix import Dataset, LoramixError, Sample, read_dataset


def test_jsonl_string_and_list_outputs(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"input": "a", "output": "x"}\n\n{"input": "b", "output": ["y", "z"]}\n', encoding="utf-8")
    ds = read_dataset(p)
    assert ds.samples == [Sample("a", ("x",)), Sample("b", ("y", "z"))]
    assert ds.samples[1].output == "y"


def test_csv_and_tsv(tmp_path):
    (tmp_path / "d.csv").write_text('input,output\n"hello, you",hi\nb,c\n', encoding="utf-8")
    (tmp_path / "d.tsv").write_text("input\toutput\nq\tr\n", encoding="utf-8")
    assert read_dataset(tmp_path / "d.csv").samples[0] == Sample("hello, you", ("hi",))
    assert read_dataset(tmp_path / "d.tsv").samples == [Sample("q", ("r",))]


def test_natural_instructions_task(tmp_path):
    task = {
        "Definition": ["Translate the word to French."],
        "Instances": [{"id": "t-1", "input": "cat", "output": ["chat"]}, {"id": "t-2", "input": "dog", "output": ["chien"]}],
    }
    p = tmp_path / "task001_words.json"
    p.write_text(json.dumps(task), encoding="utf-8")
    ds = read_dataset(p)
    assert ds.definition == "Translate the word to French."
    assert ds.samples[0] == Sample("Translate the word to French.\n\ncat", ("chat",))
    assert read_dataset(p, with_definition=False).samples[1] == Sample("dog", ("chien",))


def test_json_list_and_custom_fields(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"question": "2+2", "answer": "4"}]), encoding="utf-8")
    assert read_dataset(p, input_field="question", output_field="answer").samples == [Sample("2+2", ("4",))]


def test_hugging_face_save_to_disk(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"input": ["a", "b"], "output": [["x"], ["y", "w"]], "id": ["1", "2"]}),
            "test": datasets.Dataset.from_dict({"input": ["c"], "output": [["z"]], "id": ["3"]}),
        }
    )
    dd.save_to_disk(tmp_path / "hf")
    assert read_dataset(tmp_path / "hf").samples == [Sample("a", ("x",)), Sample("b", ("y", "w"))]
    assert read_dataset(tmp_path / "hf", split="test").samples == [Sample("c", ("z",))]
    with pytest.raises(LoramixError, match="no split 'valid'"):
        read_dataset(tmp_path / "hf", split="valid")
    dd["train"].save_to_disk(tmp_path / "single")
    assert len(read_dataset(tmp_path / "single")) == 2


@pytest.mark.parametrize(
    "content,pattern",
    [
        ("", "no samples"),
        ('{"input": "a"}\n', "missing field 'output'"),
        ('{"output": "a"}\n', "missing field 'input'"),
        ('{"input": 3, "output": "a"}\n', "must be a string"),
        ('{"input": "a", "output": []}\n', "non-empty list of strings"),
        ("not json\n", "invalid JSON"),
        ("[1, 2]\n", "expected an object"),
    ],
)
def test_bad_jsonl(tmp_path, content, pattern):
    p = tmp_path / "d.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(LoramixError, match=pattern) as info:
        read_dataset(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(LoramixError, match="not found"):
        read_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "d.jsonl").write_bytes(b'{"input": "\xff\xfe", "output": "x"}\n')
    with pytest.raises(LoramixError, match="not UTF-8"):
        read_dataset(tmp_path / "d.jsonl")
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(LoramixError, match="unknown dataset format"):
        read_dataset(tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("text,label\na,b\n")
    with pytest.raises(LoramixError, match="missing field 'input'"):
        read_dataset(tmp_path / "d.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(LoramixError, match="save_to_disk"):
        read_dataset(tmp_path / "folder")


def test_subsample_is_seeded_and_ordered():
    ds = Dataset([Sample(str(i), ("o",)) for i in range(100)], "mem")
    a, b = ds.subsample(10, seed=1), ds.subsample(10, seed=1)
    assert a.samples == b.samples and len(a) == 10
    assert [int(s.input) for s in a] == sorted(int(s.input) for s in a)
    assert ds.subsample(10, seed=2).samples != a.samples
    assert ds.subsample(None, 0) is ds and ds.subsample(500, 0) is ds


def test_fingerprint_is_format_independent(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"input": "a", "output": ["x"]}\n')
    (tmp_path / "a.csv").write_text("input,output\na,x\n")
    assert read_dataset(tmp_path / "a.jsonl").fingerprint() == read_dataset(tmp_path / "a.csv").fingerprint()
