"""Stage 7: evaluation. Batched greedy generation with the base's chat template, scored against the
references as Natural-Instructions does: ROUGE-L (rouge-score, Porter-stemmed), exact match and
"reference contained in output", each the best over a record's references."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Annotated, Any, Iterator

import torch

from .adapter import PICKLE_FILE, WEIGHTS_FILE, LoraAdapter, base_model_of
from .errors import LoramixError, setting
from .arguments import Range, checked
from .files import atomic_write_bytes, naming
from .data import Dataset, read_dataset
from .runtime import MAX_ANSWER_TOKENS, MAX_NEW_TOKENS
from .runtime.pytorch import generate_answers, load_model, load_tokenizer, with_adapter
from .runtime.scores import score
from .prompts import end_of_turn_id, prompt_ids, prompt_room


MAX_BATCH = 4096  # the most prompts generated together


@contextmanager
def answer_streams(adapter: str | Path, base: str | None, runtime: str = "auto", max_new_tokens: int = 64, *,
                   allow_pickle: bool = False) -> Iterator[Any]:
    """A function `stream(text, with_adapter) -> iterator of text pieces`: the greedy answer to `text` (a user turn in
    the chat template) of the base (`with_adapter` False) or base + `adapter`, as its tokens come, on `runtime`
    (runtime.choose_runtime). The base is loaded once for the block."""
    from threading import Thread

    from .runtime import choose_runtime, resolve_base

    base = base if base is not None else base_model_of(adapter)
    if choose_runtime(resolve_base(base), runtime) == "llama.cpp":
        from .runtime.llamacpp import Lora, gguf_lora, open_base

        with gguf_lora(adapter, base, allow_pickle=allow_pickle) as path, open_base(base) as engine:
            yield lambda text, with_adapter: engine.stream(text, lora=Lora(path) if with_adapter else None,
                                                           max_new_tokens=max_new_tokens)
        return
    from transformers import TextIteratorStreamer

    model, tokenizer = load_for_eval(base, adapter, allow_pickle=allow_pickle)

    def stream(text: str, with_adapter: bool) -> Iterator[str]:
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        ids = torch.tensor([prompt_ids(tokenizer, text, prompt_room(model, max_new_tokens))], device=next(model.parameters()).device)

        failed: list[BaseException] = []

        def run() -> None:
            try:
                with torch.inference_mode(), nullcontext() if with_adapter else model.disable_adapter():
                    model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                                   eos_token_id=end_of_turn_id(tokenizer))
            except BaseException as e:  # handed to the caller's thread; the stream ends instead of waiting forever
                failed.append(e)
                streamer.end()

        worker = Thread(target=run, daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if failed:
            raise failed[0]

    yield stream


def write_predictions(path: str | Path, dataset: Dataset, predictions: list[str]) -> None:
    """One JSON line per prediction: the record's input, the prediction and its references, in dataset order. A file
    is replaced whole (atomic_write_bytes: a file it was a hard link of keeps its bytes); a FIFO or a device
    (/dev/stdout) is written to. The path may not be the dataset's own file; one prediction per record."""
    if isinstance(predictions, (str, bytes)) or len(predictions) != len(dataset):
        raise LoramixError(f"{path}: {len(predictions)} prediction(s) for {len(dataset)} record(s); one per record")
    if dataset.source and Path(path).exists() and Path(dataset.source).exists() and Path(path).samefile(dataset.source):
        raise LoramixError(f"{path}: is the data {dataset.source}, which the predictions are of; write them elsewhere")
    text = "".join(json.dumps({"input": s.input, "prediction": p, "references": list(s.outputs)}, ensure_ascii=False) + "\n"
                   for s, p in zip(dataset, predictions))
    target = Path(path)
    if target.exists() and not target.resolve().is_file():
        with naming(path), open(path, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        atomic_write_bytes(target.resolve() if target.is_symlink() else target, text.encode("utf-8"))


def refuse_pickle(adapter: str | Path | None, allow_pickle: bool) -> None:
    """PEFT reads an adapter's adapter_model.bin (a pickle) where it has no adapter_model.safetensors: as every reader of
    loramix, only with `allow_pickle` (--allow-pickle)."""
    folder = Path(adapter) if adapter is not None else None
    if folder is not None and not allow_pickle and (folder / PICKLE_FILE).is_file() and not (folder / WEIGHTS_FILE).is_file():
        raise LoramixError(f"{folder.name or folder}: {PICKLE_FILE} is a pickle and is not loaded by default "
                           f"({setting('allow_pickle')} loads it with weights_only=True)")


def load_for_eval(base: str | None, adapter: str | Path | None = None, *, allow_pickle: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer): the base, with the PEFT adapter loaded on top when given (any adapter PEFT loads, even
    one loramix cannot compose; a pickled one only with `allow_pickle`, and then as plain tensors). `base` None means
    the adapter's own base model, else the default base."""
    import pickle
    import warnings

    refuse_pickle(adapter, allow_pickle)
    if base is None and adapter is not None:
        base = base_model_of(adapter)
    tokenizer = load_tokenizer(base)
    tokenizer.padding_side = "left"
    model = load_model(base)
    if adapter is not None:
        try:
            with warnings.catch_warnings():  # the weights-only unpickler's notes on the pickle protocol
                warnings.simplefilter("ignore", UserWarning)
                model = with_adapter(model, adapter, base).eval()
        except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused what is not plain tensors
            why = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)[:200]
            raise LoramixError(f"{Path(adapter).name}: {PICKLE_FILE}: not loadable as plain tensors ({why})") from None
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model, tokenizer


@contextmanager
def merged_adapter(model: Any, adapter: str | Path | LoraAdapter | None) -> Iterator[Any]:
    """A plain transformers model whose adapted modules hold base + adapter (scale * B @ A; transposed for
    transformers' Conv1D, whose weight is [in, out]) for the duration of the block (no adapter: the model unchanged).
    Each adapted module gets a new weight, so a weight it shares with another module (tied input and output
    embeddings) is not changed there; the original weights, ties included, are put back after. Generation then runs
    at the base model's speed, without LoRA layers' extra work per token."""
    if adapter is None:
        yield model
        return
    from transformers.pytorch_utils import Conv1D

    adapter = adapter if isinstance(adapter, LoraAdapter) else LoraAdapter(adapter)
    saved: dict[str, torch.nn.Parameter] = {}
    try:
        with torch.no_grad():
            for name, lora in sorted(adapter.modules.items()):
                try:
                    module = model.get_submodule(name)
                except AttributeError:
                    raise LoramixError(f"{adapter.name}: module '{name}' is not in the base model") from None
                a, b = adapter.factors(name)
                delta = lora.scale * (b.double() @ a.double())  # [out, in]
                weight = module.weight
                if isinstance(module, Conv1D):
                    delta = delta.T
                if tuple(delta.shape) != tuple(weight.shape):
                    raise LoramixError(f"{adapter.name}: module '{name}' has weight {list(weight.shape)} in the base "
                                       f"model, the adapter's update {list(delta.shape)}")
                saved[name] = weight
                module.weight = torch.nn.Parameter(weight.detach() + delta.to(device=weight.device, dtype=weight.dtype),
                                                   requires_grad=False)
        yield model
    finally:
        for name, original in saved.items():
            model.get_submodule(name).weight = original


@checked
def evaluate(
    data: str | Path | Dataset,
    *,
    base: str | None = None,
    adapter: str | Path | None = None,
    limit: Annotated[int, Range(1)] | None = None,
    batch_size: Annotated[int, Range(1, MAX_BATCH)] = 32,
    max_new_tokens: Annotated[int, Range(1, MAX_ANSWER_TOKENS)] = MAX_NEW_TOKENS,
    model: Any = None,
    tokenizer: Any = None,
    runtime: str = "auto",
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Generate for the first `limit` records of `data` and score them. Pass `model` / `tokenizer` to reuse
    a loaded model; otherwise the base (and adapter) are loaded on `runtime` (runtime.choose_runtime: 'auto' runs a
    GGUF base on llama.cpp, the adapter applied as a GGUF LoRA). Returns rougeL, exact_match, contains, n,
    seconds, the runtime and the predictions. `allow_pickle`: also load an adapter_model.bin (weights only)."""
    from .runtime import choose_runtime, resolve_base

    if model is None:
        refuse_pickle(adapter, allow_pickle)
    if (model is None) != (tokenizer is None):
        raise LoramixError("evaluate(): pass model and tokenizer together (or neither: the base is loaded)")

    dataset = data if isinstance(data, Dataset) else read_dataset(data, split="test")
    if limit is not None:
        dataset = Dataset(dataset.samples[:limit], dataset.source, dataset.definition)
    if not len(dataset):
        raise LoramixError(f"{dataset.source}: no records to evaluate")
    if base is None and adapter is not None:
        base = base_model_of(adapter)  # what load_for_eval loads, and what the result names
    kind = "torch" if model is not None else choose_runtime(resolve_base(base), runtime)
    inputs = [s.input for s in dataset]
    if kind == "llama.cpp":
        predictions, seconds = _answers_llamacpp(base, adapter, inputs, max_new_tokens, allow_pickle)
    else:
        if model is None:
            model, tokenizer = load_for_eval(base, adapter, allow_pickle=allow_pickle)
        start = time.perf_counter()
        predictions = generate_answers(model, tokenizer, inputs, batch_size=batch_size, max_new_tokens=max_new_tokens)
        seconds = time.perf_counter() - start
    result: dict[str, Any] = score(predictions, dataset)
    result["seconds"] = round(seconds, 2)
    result["base_model"] = base
    result["adapter"] = str(adapter) if adapter is not None else None
    result["runtime"] = kind
    result["predictions"] = predictions
    return result


def _answers_llamacpp(base: str | None, adapter: str | Path | None, inputs: list[str], max_new_tokens: int,
                      allow_pickle: bool = False) -> tuple[list[str], float]:
    """Greedy answers of `base` on llama.cpp (+ `adapter`, written as a GGUF LoRA for the block), and the seconds
    generation took."""
    from .runtime.llamacpp import Lora, gguf_lora, open_base

    with gguf_lora(adapter, base, allow_pickle=allow_pickle) if adapter is not None else nullcontext() as path, open_base(base) as engine:
        start = time.perf_counter()
        answers = engine.answers(inputs, lora=Lora(path) if path else None, max_new_tokens=max_new_tokens)
        return answers, time.perf_counter() - start
