"""loramix reads an adapter as PEFT applies it: for generated adapter_config.json files and tensors on a tiny Llama,
every module's update loramix reads equals the one `PeftModel` applies (zero where PEFT puts no LoRA layer), or
loramix refuses an adapter that PEFT refuses (or whose update PEFT makes zero everywhere). Derandomized cases by
default; LORAMIX_FUZZ_RANDOM=1 draws new ones."""

from __future__ import annotations

import copy
import json
import re
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from loramix.adapter import LoraAdapter
from loramix.errors import LoramixError

# the tiny Llama of conftest.tiny_base: hidden 32, MLP 64, 4 heads of 8, 2 kv heads, 2 layers, untied lm_head
SHAPES = {**{f"model.layers.{i}.self_attn.{p}": (16 if p in ("k_proj", "v_proj") else 32, 32)
             for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
          **{f"model.layers.{i}.mlp.{p}": ((32, 64) if p == "down_proj" else (64, 32))
             for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}}
SHORT = sorted({m.rsplit(".", 1)[-1] for m in SHAPES})
# patterns where `re` and other engines differ (fuzzy matching, POSIX classes, possessive forms), anchors, groups
PATTERNS = ["q_proj", "v_proj", "layers.0.self_attn.q_proj", r"layers\.1\..*", r".*\.1\.mlp\..*", "q_proj{e<=1}",
            "[[:alpha:]]_proj", "[a-z]_proj", "(?P<idx>q)_proj", "^model.*down_proj", ".*", r"self_attn\.(q|k)_proj",
            "model.layers.0.mlp.up_proj", "(q|v)_proj", "proj", "k_proj|o_proj", r"\w+_proj", "(?i)Q_PROJ"]
TARGETS = (st.none() | st.sampled_from(["all-linear", "ALL-LINEAR"]) | st.sampled_from(PATTERNS)
           | st.lists(st.sampled_from(SHORT + ["lm_head", *sorted(SHAPES)[:3], "proj", "self_attn"]), min_size=1,
                      max_size=4, unique=True))
CASES = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])


@st.composite
def adapters(draw):
    """(adapter_config.json, the modules given tensors): PEFT's own fields, values where readers can differ."""
    config = {
        "peft_type": "LORA", "r": draw(st.sampled_from([2, 4])), "lora_alpha": draw(st.sampled_from([4, 8, 16])),
        "use_rslora": draw(st.booleans()), "target_modules": draw(TARGETS), "bias": "none", "lora_dropout": 0.0,
        "rank_pattern": draw(st.dictionaries(st.sampled_from(PATTERNS), st.sampled_from([1, 2, 4]), max_size=3)),
        "alpha_pattern": draw(st.dictionaries(st.sampled_from(PATTERNS), st.sampled_from([2, 32]), max_size=3)),
        "exclude_modules": draw(st.none() | st.sampled_from(PATTERNS) | st.lists(st.sampled_from(SHORT), max_size=2)),
        "task_type": draw(st.sampled_from(["CAUSAL_LM"] * 6 + [None, "SEQ_2_SEQ_LM", "causal_lm", "GENERATION"])),
        "init_lora_weights": True,
    }
    if isinstance(config["target_modules"], list) and draw(st.booleans()):
        config["layers_to_transform"] = draw(st.sampled_from([0, 1, [0], [1], [0, 1], []]))
        config["layers_pattern"] = draw(st.sampled_from([None, "layers", ["layers"], "mlp", ""]))
    with_tensors = draw(st.lists(st.sampled_from(sorted(SHAPES) + ["lm_head"]), min_size=1, max_size=8, unique=True))
    return config, with_tensors


def write(folder: Path, config: dict, modules: list[str], base: Path, vocab: int) -> None:
    """The adapter's files, each module's rank the one PEFT gives it (its own get_pattern_key)."""
    from peft.utils.other import get_pattern_key

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m in modules:
        out_f, in_f = SHAPES.get(m, (vocab, 32))
        try:
            r = config["rank_pattern"].get(get_pattern_key(config["rank_pattern"].keys(), m), config["r"])
        except re.error:  # a key PEFT cannot compile: PEFT refuses the adapter whatever its tensors
            r = config["r"]
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, in_f, generator=g)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(out_f, r, generator=g)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))


def peft_updates(model, folder: Path) -> dict[str, torch.Tensor] | None:
    """Every module's update as PeftModel applies it (a LoRA layer's get_delta_weight), or None if PEFT refuses."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(folder))
    except Exception:  # noqa: BLE001 - whatever PEFT raises, it refuses the adapter
        return None
    inner = peft_model.base_model.model
    return {name: layer.get_delta_weight("default").double() for name, layer in inner.named_modules()
            if isinstance(layer, LoraLayer) and "default" in layer.lora_A}


@pytest.fixture(scope="module")
def base_model(tiny_base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base).eval()


def same_as_peft(folder: Path, base_model) -> str:
    """Assert that loramix reads `folder` as PEFT applies it (or refuses what PEFT refuses); which of those."""
    theirs = peft_updates(base_model, folder)
    try:
        ours = LoraAdapter(folder)
    except LoramixError as e:
        assert "\n" not in str(e)
        # refused: PEFT refuses it too, or its update is zero in every module
        assert theirs is None or all(not bool(d.any()) for d in theirs.values()), f"loramix refused what PEFT loads: {e}"
        return "refused by both" if theirs is None else "refused, PEFT's update zero"
    assert theirs is not None, f"loramix read an adapter PEFT refuses: {sorted(ours.modules)}"
    for name in sorted(set(theirs) | set(ours.modules)):
        peft_delta = theirs.get(name)
        mine = ours.delta(name) if name in ours.modules else None
        if mine is None:
            assert peft_delta is None or not bool(peft_delta.any()), f"{name}: PEFT applies an update loramix skips"
        elif peft_delta is None:
            raise AssertionError(f"{name}: loramix reads an update PEFT never applies")
        else:
            torch.testing.assert_close(mine, peft_delta, rtol=1e-5, atol=1e-6, msg=f"{name}: another update than PEFT's")
    return "read alike"


@CASES
@given(case=adapters())
def test_loramix_reads_each_module_as_peft_applies_it(tmp_path, tiny_base, base_model, case):
    config, modules = case
    folder = Path(tempfile.mkdtemp(dir=tmp_path)) / "ad"
    write(folder, config, modules, tiny_base, base_model.config.vocab_size)
    event(same_as_peft(folder, base_model))


BASE_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
               "task_type": "CAUSAL_LM"}
ALL = sorted(SHAPES)


@pytest.mark.parametrize("change,modules,outcome", [
    ({"target_modules": None}, ALL, "read alike"),  # PEFT's default for llama: q_proj and v_proj, not k_proj
    ({"target_modules": "all-linear"}, ALL + ["lm_head"], "read alike"),  # all-linear leaves the output layer out
    ({"alpha_pattern": {"q_proj{e<=1}": 64}}, ALL, "read alike"),  # `regex` matched k_proj and v_proj fuzzily
    ({"target_modules": ".*(q_proj|[[:alpha:]]_proj)"}, ALL, "read alike"),  # a POSIX class is not one in `re`
    ({"rank_pattern": {r"self_attn\.(q|v)_proj": 2}}, ALL, "read alike"),
    ({"task_type": "causal_lm"}, ALL, "refused by both"),  # PEFT refuses an unknown task type
    ({"target_modules": ["self_attn"]}, ALL, "refused by both"),  # not a layer PEFT adapts
    ({"target_modules": ["w9"]}, ALL, "refused by both"),  # selects no module of the base
])
def test_the_known_differences_from_peft_are_gone(tmp_path, tiny_base, base_model, change, modules, outcome):
    write(tmp_path / "ad", {**BASE_CONFIG, "rank_pattern": {}, "alpha_pattern": {}, **change}, modules, tiny_base,
          base_model.config.vocab_size)
    assert same_as_peft(tmp_path / "ad", base_model) == outcome
