"""Bad option values and model ids: one line (a LoramixError or a usage error), never a traceback or a partial output."""

import pytest
from helpers import topic_records, write_jsonl
from typer.testing import CliRunner

from loramix.cli import app
from loramix.errors import LoramixError
from loramix.runtime.pytorch import load_model, load_tokenizer
from loramix.train_config import TrainConfig


@pytest.mark.parametrize("base", ["a/b/c", "bad id!!", "/no/such/folder"])
@pytest.mark.parametrize("load", [load_model, load_tokenizer])
def test_an_unloadable_base_is_one_line(base, load):
    with pytest.raises(LoramixError, match=r"^cannot load .*base model") as e:
        load(base)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw", [
    {"steps": 0}, {"batch_size": -1}, {"lr": float("nan")}, {"lr": -1e-3}, {"rank": 0}, {"alpha": float("inf")},
    {"save_dtype": "int8"}, {"target_modules": []}, {"budget": -1.0}, {"max_tokens": 0}, {"warmup": -1},
])
def test_train_config_refuses_what_no_run_can_use(kw):
    """From Python the message names the field; the CLI names its option."""
    (field,) = kw
    with pytest.raises(LoramixError, match=f"^{field} must be") as e:
        TrainConfig(**kw)
    assert e.value.render(lambda name: "--" + name.replace("_", "-")).startswith(f"--{field.replace('_', '-')} must be")


def test_train_with_zero_steps_writes_nothing(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 4))
    r = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "out"), "--steps", "0"])
    assert isinstance(r.exception, LoramixError) and "steps must be" in str(r.exception)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [
    ["eval", "--batch-size", "0"], ["eval", "--max-new-tokens", "0"], ["eval", "--max-new-tokens", "10000000"],
    ["eval", "--limit", "-3"],
])
def test_numeric_options_out_of_range_are_usage_errors(tmp_path, args):
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 4))
    r = CliRunner().invoke(app, [args[0], "--data", str(data), *args[1:]])
    assert r.exit_code == 2 and "Invalid value" in r.output


@pytest.mark.parametrize("delay", [0.3, 8.0])
def test_ctrl_c_is_one_line_and_leaves_nothing(tmp_path, delay):
    """SIGINT while the command still imports torch and transformers (0.3 s), or while it trains (8 s):
    'interrupted', exit status 130, no traceback, no output folder."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 8))
    script = Path(sys.executable).with_name("loramix")
    p = subprocess.Popen([str(script), "train", "--data", str(data), "--out", str(tmp_path / "out"), "--steps", "100000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_an_output_that_is_an_input_is_refused(tmp_path, tiny_base):
    """Writing over (or inside) what the command reads would destroy or corrupt it, even with --force."""
    from helpers import make_bank

    from loramix import generate
    from loramix.export import export_gguf, export_merged
    from loramix.train import train

    bank = make_bank(tmp_path / "bank", n=2, base=str(tiny_base))
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 6))
    for out in (bank / "task_animals", bank, tmp_path):
        with pytest.raises(LoramixError, match=r"(is|holds|is inside) the bank .* which this command reads"):
            generate(bank, data, out, force=True, check=0)
    with pytest.raises(LoramixError, match=r"holds the data .* which this command reads"):
        train(data, tmp_path, force=True, base=str(tiny_base))
    adapter = bank / "task_animals"
    with pytest.raises(LoramixError, match=r"is the base model"):
        export_merged(adapter, tiny_base, base=str(tiny_base), force=True)
    with pytest.raises(LoramixError, match=r"is inside the adapter"):
        export_gguf(adapter, adapter / "adapter_model.safetensors", base=str(tiny_base), force=True)
    with pytest.raises(LoramixError, match=r"already exists \(use force=True"):
        export_gguf(adapter, data, base=str(tiny_base))
    with pytest.raises(LoramixError, match=r"exists and is a folder"):
        export_gguf(adapter, tmp_path, base=str(tiny_base), force=True)
    r = CliRunner().invoke(app, ["eval", "--data", str(data), "--adapter", str(adapter), "--base", str(tiny_base),
                                 "--predictions", str(data)])
    assert isinstance(r.exception, LoramixError) and "is the data" in str(r.exception)
    assert len(data.read_text().splitlines()) == 6
    with pytest.raises(LoramixError, match=r"is inside the adapter"):  # even a new file: nothing goes inside an input
        export_gguf(adapter, adapter / "a.gguf", base=str(tiny_base))
    assert not (adapter / "a.gguf").exists()
    out = export_gguf(adapter, tmp_path / "a.gguf", base=str(tiny_base))  # beside it is fine
    assert out.is_file()
