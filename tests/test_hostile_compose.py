"""Compositions that would be silently wrong: an update beyond the output dtype's range."""

from pathlib import Path

import pytest
import torch
from helpers import make_bank, topic_records, write_jsonl
from safetensors.torch import load_file, save_file

from loramix import Bank
from loramix.adapter import update_peak
from loramix.compose.stream import write_composition
from loramix.errors import LoramixError


def test_update_peak_is_the_dense_maximum_when_beyond_the_limit():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 32, generator=g), torch.randn(16, 4, generator=g)
    dense = float((2.5 * (b.double() @ a.double())).abs().max())
    assert update_peak(a, b, 2.5, limit=0.0, rows=5) == pytest.approx(dense, rel=1e-12)
    assert dense <= update_peak(a, b, 2.5, limit=1e9)  # within the limit: at least the peak (a bound)


def test_an_update_beyond_float16_is_refused_though_its_factors_fit(tmp_path):
    """Factors of a few thousand fit float16 (65504); their product does not: merging it in float16 would give inf."""
    root = make_bank(tmp_path / "bank", n=2)
    weights = root / "task_animals" / "adapter_model.safetensors"
    save_file({k: v * 1000 for k, v in load_file(weights).items()}, weights)
    bank = Bank(root)
    assert max(float(v.abs().max()) for v in load_file(weights).values()) < torch.finfo(torch.float16).max
    with pytest.raises(LoramixError, match=r"update reaches .* beyond torch.float16's range"):
        write_composition(tmp_path / "half", bank, {"task_animals": 1.0}, dtype=torch.float16)
    out = write_composition(tmp_path / "new" / "full", bank, {"task_animals": 1.0}, dtype=torch.float32)  # folders made
    assert out.config["r"] > 0 and (tmp_path / "new" / "full" / "adapter_model.safetensors").is_file()


def test_atomic_dir_refuses_the_current_folder_and_leaves_nothing_behind(tmp_path, monkeypatch):
    from loramix.files import atomic_dir

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", "sub/..", str(tmp_path)):
        with pytest.raises(LoramixError, match="is the current folder or holds it"):
            with atomic_dir(out, force=True):
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and not any(work.iterdir())


def test_atomic_dir_replacing_a_folder_another_run_moved_leaves_no_old_folder(tmp_path, monkeypatch):
    """Two --force runs race: the second finds the output already moved aside by the first; it still writes its
    output and no empty .old folder stays."""
    import os

    from loramix import files

    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    real = os.replace

    def racing(src, dst):  # the other run moves `out` away just before this one does
        if Path(src) == out and out.exists():
            real(out, tmp_path / "elsewhere")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", racing)
    with files.atomic_dir(out, force=True) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]
    assert (out / "b").read_text() == "new"


def test_gguf_export_never_touches_another_runs_temporary_file(tmp_path, tiny_base):
    """Two exports to one file each write their own temporary file: one run's clean-up leaves the other's alone."""
    from loramix import generate
    from loramix.export import export_gguf

    bank = make_bank(tmp_path / "bank", base=str(tiny_base), n=3)
    generate(bank, write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 10)), tmp_path / "ad", max_samples=8, check=0)
    other = tmp_path / ".a.gguf.tmp"  # the name a fixed-name export would use, being written by another run
    other.write_bytes(b"in progress")
    out = export_gguf(tmp_path / "ad", tmp_path / "a.gguf")
    assert other.read_bytes() == b"in progress" and out.stat().st_size > 0
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".a.gguf")) == [other.name]


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_entry_replaced_while_composing_is_refused(tmp_path):
    """`bank add --force` between opening the bank and reading an entry's tensors: the composition would mix the old
    adapter's modules with the new one's; it is refused instead, and nothing is written."""
    from helpers import write_adapter

    from loramix.hub import add_adapter

    root = make_bank(tmp_path / "bank", n=2)
    bank = Bank(root)
    data = write_jsonl(tmp_path / "d.jsonl", topic_records("fruits", 3))
    add_adapter(root, str(write_adapter(tmp_path / "new", seed=7)), data, name="task_animals", force=True)
    (tmp_path / "out").mkdir()
    with pytest.raises(LoramixError, match=r"task_animals: adapter_model.safetensors changed while loramix was reading it"):
        write_composition(tmp_path / "out", bank, {"task_animals": 0.5, "task_colors": 0.5})
    write_composition(tmp_path / "out", Bank(root), {"task_animals": 0.5, "task_colors": 0.5})  # reopened: the new entry


@pytest.mark.parametrize("alpha,dtype", [(1e-16, torch.float16), (1e-12, torch.float16), (1e-90, torch.float32)])
def test_factors_that_underflow_the_output_dtype_are_refused(tmp_path, alpha, dtype):
    """The output's scale is 1 (lora_alpha = r), so a tiny entry scale lands in the factors, below the dtype's range."""
    root = make_bank(tmp_path / "bank", n=2, alpha=alpha)
    (tmp_path / "out").mkdir()
    with pytest.raises(LoramixError, match=r"factors lose .* of their size in torch.float(16|32)"):
        write_composition(tmp_path / "out", Bank(root), {"task_animals": 1.0}, dtype=dtype)
