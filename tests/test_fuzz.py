"""Hostile inputs, generated: every reader either succeeds or refuses with one line (a LoramixError), never a
traceback of another kind and never a hang (each case runs under a time limit)."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import struct
import tempfile
from pathlib import Path

import pytest
from helpers import write_adapter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramix import Bank, GenerateConfig, LoraAdapter, read_dataset
from loramix.errors import LoramixError

CASE_SECONDS = 5  # a case taking longer is a hang
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])

SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=24)
           | st.sampled_from(["(.*.*.*)*X", "[", "q_proj", ".*", "all-linear", "model.layers.0.self_attn.q_proj"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12) | st.sampled_from(
    ["q_proj", "v_proj", ".*", "(.*.*.*)*X", "model.layers.1.self_attn.q_proj"]), inner, max_size=4), max_leaves=10)
CONFIG_FIELDS = ["peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
                 "exclude_modules", "bias", "init_lora_weights", "fan_in_fan_out", "layers_to_transform",
                 "layers_pattern", "base_model_name_or_path", "lora_dropout", "task_type", "use_dora"]


@contextlib.contextmanager
def time_limit(seconds: int = CASE_SECONDS):
    def hang(*_):
        raise TimeoutError(f"the case took more than {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outcome(fn) -> object:
    """fn()'s result, or None when it refused with a one-line LoramixError; anything else fails the test."""
    with time_limit():
        try:
            return fn()
        except LoramixError as e:
            assert str(e).strip() and "\n" not in str(e).strip(), f"a refusal of more than one line: {e!r}"
            return None


def fresh(tmp_path: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=tmp_path))


def read_everything(folder: Path) -> None:
    """Open the adapter and read every module's factors, as composing it would."""
    adapter = LoraAdapter(folder)
    for module in adapter.modules:
        adapter.factors(module)


@FUZZ
@given(field=st.sampled_from(CONFIG_FIELDS), value=JSON)
def test_any_adapter_config_value_is_read_or_refused_in_one_line(tmp_path, field, value):
    folder = write_adapter(fresh(tmp_path) / "ad")
    config = json.loads((folder / "adapter_config.json").read_text())
    config[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    outcome(lambda: read_everything(folder))


@FUZZ
@given(text=st.text(max_size=200) | st.sampled_from(["[" * 100_000, '{"r": ' + "9" * 5000 + "}", "NaN", "\ud800"]))
def test_any_adapter_config_text_is_read_or_refused_in_one_line(tmp_path, text):
    folder = write_adapter(fresh(tmp_path) / "ad")
    (folder / "adapter_config.json").write_bytes(text.encode("utf-8", "surrogatepass"))
    outcome(lambda: read_everything(folder))


HEADER_ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "BOOL", "F8_E4M3", "XX"]) | JSON,
    "shape": st.lists(st.integers(min_value=-2, max_value=2**40), max_size=3) | JSON,
    "data_offsets": st.lists(st.integers(min_value=-2, max_value=2**40), min_size=2, max_size=2) | JSON,
})
TENSOR_NAMES = st.sampled_from([f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{w}.weight"
                                for i in (0, 1) for p in ("q_proj", "v_proj") for w in "AB"]) | st.text(max_size=30)


@FUZZ
@given(header=st.dictionaries(TENSOR_NAMES, HEADER_ENTRY, max_size=4), data=st.binary(max_size=512),
       length=st.none() | st.integers(min_value=0, max_value=2**64 - 1))
def test_any_safetensors_header_is_read_or_refused_in_one_line(tmp_path, header, data, length):
    folder = write_adapter(fresh(tmp_path) / "ad")
    blob = json.dumps(header).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    outcome(lambda: read_everything(folder))


SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "BOOL": 1}


@st.composite
def near_valid_files(draw) -> bytes:
    """A valid safetensors file (tensors laid out contiguously, in any header order), often with one defect: an
    offset moved, a byte too many or too few, a shape or dtype changed, a header with leading spaces."""
    names = draw(st.lists(st.text("abc", min_size=1, max_size=3), min_size=0, max_size=4, unique=True))
    header, at = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(SIZES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=2))
        size = SIZES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + size]}
        at += size
    if names and draw(st.booleans()):
        victim = header[draw(st.sampled_from(names))]
        kind = draw(st.sampled_from(["offset0", "offset1", "shape", "dtype"]))
        if kind.startswith("offset"):
            victim["data_offsets"][int(kind[-1])] += draw(st.sampled_from([-1, 1, 4]))
        elif kind == "shape":
            victim["shape"] = victim["shape"] + [2]
        else:
            victim["dtype"] = "F64" if victim["dtype"] != "F64" else "U8"
    order = draw(st.permutations(list(header)))
    blob = json.dumps({k: header[k] for k in order}).encode()
    if draw(st.booleans()):
        blob = draw(st.sampled_from([b" ", b"", b"  \n"])) + blob + draw(st.sampled_from([b" ", b"", b"\n"]))
    data = bytes(at + draw(st.sampled_from([0, 0, 0, -1, 1])) if at else draw(st.sampled_from([0, 0, 1])))
    return struct.pack("<Q", len(blob)) + blob + data


@FUZZ
@given(raw=near_valid_files())
def test_the_safetensors_layout_check_agrees_with_safetensors(tmp_path, raw):
    """loramix reads a weights file's header once and checks it itself: it accepts exactly the files safetensors
    opens, with the same tensor spans."""
    from safetensors import SafetensorError, safe_open

    from loramix.adapter.safetensors import _read_safetensors_header, _safetensors_spans

    file = fresh(tmp_path) / "w.safetensors"
    file.write_bytes(raw)
    try:
        with safe_open(file, framework="numpy") as f:
            theirs = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError:
        theirs = None
    with open(file, "rb") as f:
        try:
            ours = {k: shape for k, (_, _, _, shape) in _safetensors_spans(_read_safetensors_header(f, len(raw)), len(raw)).items()}
        except ValueError:
            ours = None
    assert ours == theirs


@FUZZ
@given(cut=st.integers(min_value=0, max_value=4000), flip=st.lists(st.tuples(st.integers(min_value=0, max_value=4000),
                                                                         st.integers(0, 255)), max_size=4))
def test_a_damaged_weights_file_is_read_or_refused_in_one_line(tmp_path, cut, flip):
    folder = write_adapter(fresh(tmp_path) / "ad")
    weights = folder / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    for at, byte in flip:
        raw[at % len(raw)] = byte
    weights.write_bytes(bytes(raw[: max(cut, len(raw) - cut)]))
    outcome(lambda: read_everything(folder))


RECORD = st.dictionaries(st.sampled_from(["input", "output", "inputs", "outputs", "x"]) | st.text(max_size=6), JSON,
                         max_size=3)


@FUZZ
@given(kind=st.sampled_from([".jsonl", ".json", ".csv", ".tsv"]), records=st.lists(RECORD | JSON, max_size=5),
       noise=st.text(max_size=80))
def test_any_dataset_file_is_read_or_refused_in_one_line(tmp_path, kind, records, noise):
    path = fresh(tmp_path) / f"data{kind}"
    if kind == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in records) + noise
    elif kind == ".json":
        text = json.dumps(records) if not noise else noise
    else:
        sep = "," if kind == ".csv" else "\t"
        text = f"input{sep}output\n" + "".join(f"{json.dumps(r)}{sep}{noise}\n" for r in records) + noise
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    dataset = outcome(lambda: read_dataset(path))
    if dataset is not None:  # what was read is plain text
        assert len(dataset) > 0
        for s in dataset:
            assert isinstance(s.input, str) and s.outputs and all(isinstance(o, str) for o in s.outputs)
            (s.input + "".join(s.outputs)).encode("utf-8")


GENERATE_FIELDS = ["top_k", "temperature", "max_samples", "scale", "check", "check_singles", "check_tops", "refine",
                   "refine_steps", "refine_budget", "refine_max_tokens", "rank", "dtype", "seed", "signature",
                   "distance", "operator", "compose", "check_criterion", "refine_method"]


@FUZZ
@given(field=st.sampled_from(GENERATE_FIELDS), value=SCALARS)
def test_any_generate_setting_is_taken_or_refused_in_one_line(field, value):
    config = outcome(lambda: GenerateConfig(**{field: value}))
    if config is not None:
        json.dumps({field: getattr(config, field)}, allow_nan=False)  # what loramix.json would record


@pytest.fixture
def bank_with_config(tmp_path):
    def make(config_change: dict) -> Path:
        root = fresh(tmp_path)
        for i in range(2):
            folder = write_adapter(root / f"entry{i}", seed=i)
            (folder / "train.jsonl").write_text('{"input": "a", "output": "b"}\n', encoding="utf-8")
        config = json.loads((root / "entry1" / "adapter_config.json").read_text())
        config.update(config_change)
        (root / "entry1" / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
        return root

    return make


@FUZZ
@given(field=st.sampled_from(CONFIG_FIELDS), value=JSON)
def test_any_bank_entry_config_is_taken_or_refused_in_one_line(bank_with_config, field, value):
    root = bank_with_config({field: value})
    outcome(lambda: Bank(root).shapes)


OPTIONS = ["--top-k", "--temperature", "--max-samples", "--scale", "--rank", "--dtype", "--seed", "--signature",
           "--distance", "--operator", "--compose", "--show", "--check-criterion", "--refine-method"]
OPTION_VALUES = st.sampled_from(["0", "-1", "1", "3", "nan", "inf", "-inf", "1e309", "abc", "", "9" * 30, "full", "paper",
                                 "float16", "2.5", " 1", "0x10", "embed", "w2"]) | st.text(max_size=8)


@pytest.fixture(scope="module")
def cli_bank(tmp_path_factory):
    from helpers import make_bank, topic_records, write_jsonl

    root = tmp_path_factory.mktemp("cli")
    bank = make_bank(root / "bank", n=3)
    data = write_jsonl(root / "task.jsonl", topic_records("animals", 6))
    return bank, data


@settings(FUZZ, max_examples=25)
@given(options=st.lists(st.tuples(st.sampled_from(OPTIONS), OPTION_VALUES), min_size=1, max_size=2))
def test_any_generate_command_line_gives_a_result_or_one_line(cli_bank, tmp_path, options):
    """`loramix generate` with hostile option values: exit 0 and a readable adapter, or a one-line refusal (a usage
    error, exit 2, or a LoramixError, exit 1) and no output folder; never a traceback, never a hang."""
    from typer.testing import CliRunner

    from loramix import read_report
    from loramix.cli import app

    bank, data = cli_bank
    out = fresh(tmp_path) / "out"
    args = ["generate", "--bank", str(bank), "--data", str(data), "--out", str(out), "--check", "0"]
    for option, value in options:
        args += [option, value]
    with time_limit(30):
        r = CliRunner().invoke(app, args)
    if r.exit_code == 0:
        LoraAdapter(out)
        assert read_report(out).coefficients
        return
    assert not out.exists(), "a failed run left an output"
    if r.exit_code == 2:  # typer's usage error
        assert "Traceback" not in r.output
        return
    assert r.exit_code == 1 and isinstance(r.exception, LoramixError), (args, repr(r.exception))
    assert "\n" not in str(r.exception).strip()
