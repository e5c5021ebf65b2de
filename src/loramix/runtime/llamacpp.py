"""A GGUF base model on llama.cpp (llama-cpp-python's C API): greedy answers, teacher-forced answer scores and
streaming, with GGUF LoRA adapters applied at runtime scales (a scale changes without reloading anything).

Prompts are the base's chat template through its transformers tokenizer (read from the GGUF), so both runtimes see
the same token ids. Several sequences run in one batch: the prefix they share (system turn, task definition) is
decoded once into sequence 0 and its KV cells shared with the others (llama_memory_seq_cp), each sequence's own
tokens follow in one batch, and greedy decoding steps every unfinished sequence together (on 2 cores a 7B model's
step is compute-bound already: 16 sequences gave 11.4 tokens/s against 7.9 for one, runtime.md). A teacher-forced
pass over prompt + answer leaves the prompt's KV cache in place: greedy answers continue from it with the answer's
cells removed."""

from __future__ import annotations

import ctypes
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import LoramixError
from .llamacpp_lib import _LOG, _lib, _why
from .memory import check_fits, gguf_bytes


def _refuse_base_gguf(path: Path) -> None:
    """Why llama.cpp could not load `path` as a base model, in one line: what its header says (runtime.check_base_gguf:
    unreadable or truncated, a LoRA adapter, no architecture), else llama.cpp's own last error."""
    from . import check_base_gguf

    arch = check_base_gguf(path)  # the header read once: its refusals first
    raise LoramixError(f"{path}: llama.cpp cannot load this base model (architecture {arch}: {_why()})")


@dataclass(frozen=True)
class Lora:
    """A GGUF LoRA adapter file at `scale` (1: as trained; 0: the base)."""

    path: Path
    scale: float = 1.0


class LlamaCpp:
    """A GGUF base on llama.cpp, with its transformers tokenizer (prompts, answers' text: `tokenizer`). `base`: the name
    the user gave it (None: the default base); `threads`: CPU threads
    (default: the CPUs this process may use); `context`: KV cells shared by the sequences of one batch; `sequences`:
    at most this many sequences per batch. The model is read without mmap (its memory checked first): an mmapped
    model keeps a second, repacked copy on CPUs with AVX2."""

    def __init__(self, path: str | Path, base: str | None = None, *, threads: int | None = None, context: int = 4096,
                 sequences: int = 32, label: str | None = None):
        from .pytorch import load_tokenizer

        self.path = Path(path)
        self.label = label or str(path)
        self.base = base  # the name it was opened by: its tokenizer's, and the base adapters are written for
        check_fits(gguf_bytes(self.path), f"base model {self.label} on llama.cpp",
                   "use a smaller quantization of it (e.g. Q4_K_M)")
        lib = self.lib = _lib()
        self.threads = threads or len(os.sched_getaffinity(0))
        mparams = lib.llama_model_default_params()
        mparams.load_mode = lib.LLAMA_LOAD_MODE_NONE
        mparams.n_gpu_layers = 0
        _LOG.clear()
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            _refuse_base_gguf(self.path)
        trained = lib.llama_model_n_ctx_train(self.model)
        self.context = min(context, trained) if trained > 0 else context
        self.sequences = max(1, min(sequences, lib.llama_max_parallel_sequences()))
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = self.context
        cparams.n_batch = self.context
        cparams.n_ubatch = min(512, self.context)
        cparams.n_seq_max = self.sequences
        cparams.kv_unified = True  # the shared prefix's cells serve every sequence
        cparams.n_threads = cparams.n_threads_batch = self.threads
        cparams.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise LoramixError(f"{self.path}: llama.cpp cannot make a context for this base model ({_why()})")
        self.memory = lib.llama_get_memory(self.ctx)
        self.vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        self.batch = lib.llama_batch_init(self.context, 0, 1)
        self._adapters: dict[Path, Any] = {}
        try:  # once llama.cpp has taken the file as a base model
            self.tokenizer = load_tokenizer(base if base is not None else str(self.path))
        except LoramixError:
            self.close()
            raise
        if self.vocab < len(self.tokenizer):
            self.close()
            raise LoramixError(f"{self.path}: the model's vocabulary ({self.vocab}) is smaller than its tokenizer's "
                               f"({len(self.tokenizer)})")
        self._applied: tuple[Any, float] | None = None
        self.seconds = {"prompt": 0.0, "generate": 0.0}  # wall seconds spent, by kind
        self.tokens = {"prompt": 0, "generate": 0}  # tokens decoded, by kind

    # -- lifetime ----------------------------------------------------------------------------------------------------
    def close(self) -> None:
        lib = getattr(self, "lib", None)
        if lib is None:  # the constructor stopped before the library was loaded
            return
        if getattr(self, "batch", None) is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
        for adapter in getattr(self, "_adapters", {}).values():
            lib.llama_adapter_lora_free(adapter)
        self._adapters = {}
        if getattr(self, "ctx", None):
            lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            lib.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        self.close()

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- adapters ----------------------------------------------------------------------------------------------------
    def use(self, lora: Lora | None) -> None:
        """Apply `lora` (None or scale 0: the base alone) to what runs next; its file is loaded once and kept."""
        lib = self.lib
        if lora is None or lora.scale == 0:
            if self._applied is not None:
                lib.llama_set_adapters_lora(self.ctx, None, 0, None)
                self._applied = None
            return
        path = Path(lora.path)
        if path not in self._adapters:
            _LOG.clear()
            adapter = lib.llama_adapter_lora_init(self.model, str(path).encode())
            if not adapter:
                raise LoramixError(f"{path}: llama.cpp refuses this LoRA adapter for base model {self.label} ({_why()})")
            self._adapters[path] = adapter
        adapter = self._adapters[path]
        if self._applied != (adapter, lora.scale):
            arr = (lib.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(lora.scale)
            if lib.llama_set_adapters_lora(self.ctx, arr, 1, scales) != 0:
                raise LoramixError(f"{path}: llama.cpp cannot apply this LoRA adapter ({_why()})")
            self._applied = (adapter, lora.scale)

    def forget(self, lora: Lora) -> None:
        """Free `lora`'s file from the model (no longer applied): a bank-wide job loads each entry once."""
        adapter = self._adapters.pop(Path(lora.path), None)
        if adapter is not None:
            if self._applied is not None and self._applied[0] == adapter:
                self.use(None)
            self.lib.llama_adapter_lora_free(adapter)

    @property
    def identity(self) -> str:
        """What names this base in a cache key (runtime.gguf_identity)."""
        from . import gguf_identity

        return gguf_identity(self.path)

    # -- decoding ----------------------------------------------------------------------------------------------------
    def _decode(self, items: Sequence[tuple[int, int, int, bool]], kind: str) -> np.ndarray:
        """Decode `items` (token, position, sequence, whether its logits are wanted) in batches of at most `context`
        tokens; returns the wanted logits, float32 [n_wanted, vocab], in item order."""
        lib, batch = self.lib, self.batch
        rows = []
        start = time.perf_counter()
        for lo in range(0, len(items), self.context):
            part = items[lo : lo + self.context]
            batch.n_tokens = len(part)
            wanted = []
            for i, (token, pos, seq, want) in enumerate(part):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = want
                if want:
                    wanted.append(i)
            code = lib.llama_decode(self.ctx, batch)
            if code != 0:
                raise LoramixError(f"llama.cpp could not decode a batch of {len(part)} tokens (code {code}: the "
                                   f"context of {self.context} cells is full)")
            for i in wanted:
                ptr = lib.llama_get_logits_ith(self.ctx, i)
                rows.append(np.ctypeslib.as_array(ptr, shape=(self.vocab,)).copy())
        self.seconds[kind] += time.perf_counter() - start
        self.tokens[kind] += len(items)
        return np.stack(rows) if rows else np.zeros((0, self.vocab), np.float32)

    def _prefill(self, seqs: Sequence[Sequence[int]], want: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Decode sequences 0..B-1 from an empty cache: their shared prefix once (sequence 0, its cells then shared with
        the others), then each one's own tokens in one batch. `want[r]`: the positions of sequence r whose logits are
        returned, as float32 [len(want[r]), vocab] per sequence. At least one own token per sequence."""
        from ..prompts import common_prefix

        self.lib.llama_memory_clear(self.memory, True)
        p = min(common_prefix(list(seqs)), *(min(w) for w in want if w)) if len(seqs) > 1 else 0
        if p:
            self._decode([(t, i, 0, False) for i, t in enumerate(seqs[0][:p])], "prompt")
            for r in range(1, len(seqs)):
                self.lib.llama_memory_seq_cp(self.memory, 0, r, 0, p)
        items, owners = [], []
        for r, seq in enumerate(seqs):
            wanted = set(want[r])
            for i in range(p, len(seq)):
                items.append((seq[i], i, r, i in wanted))
                if i in wanted:
                    owners.append(r)
        logits = self._decode(items, "prompt")
        out = [[] for _ in seqs]
        for r, row in zip(owners, logits):
            out[r].append(row)
        return [np.stack(rows) if rows else np.zeros((0, self.vocab), np.float32) for rows in out]

    def _steps(self, firsts: Sequence[np.ndarray], lengths: Sequence[int], max_new_tokens: int) -> Iterator[list[list[int]]]:
        """Greedy continuations of sequences 0..B-1, each `lengths[r]` tokens long in the cache, from `firsts[r]`, the
        logits after its last token; each stops at an end-of-generation token (not kept) or `max_new_tokens`. Yields
        every sequence's tokens so far after each step (the same lists, growing)."""
        vocab = self.lib.llama_model_get_vocab(self.model)
        eot = self.tokenizer.eos_token_id
        out: list[list[int]] = [[] for _ in firsts]
        nxt = {r: int(np.argmax(f)) for r, f in enumerate(firsts)}
        pos = list(lengths)
        for step in range(max_new_tokens):
            live = [r for r, t in nxt.items() if t != eot and not self.lib.llama_vocab_is_eog(vocab, t)]
            for r in live:
                out[r].append(nxt[r])
            if not live:
                return
            yield out
            if step == max_new_tokens - 1:
                return
            logits = self._decode([(nxt[r], pos[r], r, True) for r in live], "generate")
            for r in live:
                pos[r] += 1
            nxt = {r: int(np.argmax(row)) for r, row in zip(live, logits)}

    def _greedy(self, firsts: Sequence[np.ndarray], lengths: Sequence[int], max_new_tokens: int) -> list[list[int]]:
        """`_steps`' continuations, finished."""
        out: list[list[int]] = [[] for _ in firsts]
        for out in self._steps(firsts, lengths, max_new_tokens):
            pass
        return out

    def _groups(self, sizes: Sequence[int], extra: int) -> list[list[int]]:
        """Indices grouped in order so that a group has at most `sequences` members whose sizes (+ `extra` each) fit
        the context; each group at least one."""
        groups, current, used = [], [], 0
        for i, n in enumerate(sizes):
            if n + extra > self.context:
                raise LoramixError(f"a prompt of {n} tokens and its answer do not fit llama.cpp's context of "
                                   f"{self.context} tokens")
            if current and (len(current) == self.sequences or used + n + extra > self.context):
                groups.append(current)
                current, used = [], 0
            current.append(i)
            used += n + extra
        return groups + [current] if current else groups

    # -- what callers use --------------------------------------------------------------------------------------------
    def prompt_room(self, max_new_tokens: int) -> int:
        """The longest prompt (tokens) that leaves `max_new_tokens` in the context."""
        return max(1, self.context - max_new_tokens)

    def answers(self, inputs: Sequence[str], *, lora: Lora | None = None, max_new_tokens: int = 48,
                progress: bool = True) -> list[str]:
        """Greedy answers to `inputs` (each a user turn in the chat template), in input order."""
        from ..progress import track
        from ..prompts import prompt_ids

        self.use(lora)
        encoded = [prompt_ids(self.tokenizer, text, self.prompt_room(max_new_tokens)) for text in inputs]
        answers = [""] * len(inputs)
        groups = self._groups([len(e) for e in encoded], max_new_tokens)
        for group in track(groups, "generating (llama.cpp)", total=len(groups)) if progress else groups:
            seqs = [encoded[i] for i in group]
            firsts = [rows[-1] for rows in self._prefill(seqs, [[len(s) - 1] for s in seqs])]
            for i, ids in zip(group, self._greedy(firsts, [len(s) for s in seqs], max_new_tokens)):
                answers[i] = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return answers

    def scores(self, samples: Sequence[Any], *, lora: Lora | None = None, generate: bool = False,
               max_length: int = 256, max_new_tokens: int = 48) -> Any:
        """AnswerScores of the base (+ `lora`) on `samples` (`.input`, `.output`, `.outputs`): the teacher-forced
        answer loss, token accuracy and exact rate from one pass over prompt + answer, encoded as the PyTorch runtime
        encodes them (prompts.encode, `max_length` tokens); with `generate`, greedy answers (up to twice the longest
        reference answer and 4 tokens more, at most `max_new_tokens`) continue from the same pass's prompt cache and
        are scored by ROUGE-L."""
        from .scores import AnswerScores, score
        from ..prompts import encode

        self.use(lora)
        items = encode(self.tokenizer, samples, max_length)
        longest = min(max_new_tokens, 2 * max(n for _, n in items) + 4)
        nll, hits, total, exact = 0.0, 0, 0, 0
        answers = [""] * len(items)
        for group in self._groups([len(seq) for seq, _ in items], longest if generate else 0):
            seqs = [items[i][0] for i in group]
            want = [list(range(len(seq) - n - 1, len(seq) - 1)) for seq, n in (items[i] for i in group)]
            logits = self._prefill(seqs, want)
            for (seq, n), rows in zip((items[i] for i in group), logits):
                target = np.asarray(seq[-n:])
                shifted = rows - rows.max(1, keepdims=True)
                logp = shifted[np.arange(n), target] - np.log(np.exp(shifted).sum(1))
                nll -= float(logp.sum())
                hit = rows.argmax(1) == target
                hits += int(hit.sum())
                total += n
                exact += int(hit.all())
            if generate:
                for r, (seq, n) in enumerate(items[i] for i in group):
                    self.lib.llama_memory_seq_rm(self.memory, r, len(seq) - n, -1)
                firsts = [rows[0] for rows in logits]
                prompts = [len(seq) - n for seq, n in (items[i] for i in group)]
                for i, ids in zip(group, self._greedy(firsts, prompts, longest)):
                    answers[i] = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        rouge = score(answers, samples)["rougeL"] if generate else None
        return AnswerScores(nll / total, hits / total, exact / len(items), rouge)

    def stream(self, text: str, *, lora: Lora | None = None, max_new_tokens: int = 64) -> Iterator[str]:
        """The greedy answer to `text` as pieces of text, yielded as its tokens come (a piece ends on a whole
        character)."""
        from ..prompts import prompt_ids

        self.use(lora)
        ids = prompt_ids(self.tokenizer, text, self.prompt_room(max_new_tokens))
        first = self._prefill([ids], [[len(ids) - 1]])[0][-1]
        shown = ""
        for (out,) in self._steps([first], [len(ids)], max_new_tokens):
            now = self.tokenizer.decode(out, skip_special_tokens=True)
            if not now.endswith("\ufffd") and len(now) > len(shown):
                yield now[len(shown):]
                shown = now

    def speed(self, sample: Any) -> Any:
        """runtime.Speed measured on one example (`.input`, `.output`): its prompt and answer decoded from an empty cache,
        then one decoding step after it; on the base alone."""
        from . import Speed
        from ..prompts import encode

        self.use(None)
        seq, _ = encode(self.tokenizer, [sample], 256)[0]
        start = time.perf_counter()
        first = self._prefill([seq], [[len(seq) - 1]])[0][-1]
        middle = time.perf_counter()
        self._decode([(int(np.argmax(first)), len(seq), 0, True)], "generate")
        end = time.perf_counter()
        return Speed(len(seq) / max(middle - start, 1e-6), end - middle)


def open_base(base: str | None, **options: Any) -> LlamaCpp:
    """The base model `base` (a GGUF file, local or 'owner/repo/file.gguf'; None or 'default': the default base's
    shipped GGUF) on llama.cpp, with its transformers tokenizer. `options`: LlamaCpp's."""
    from . import resolve_base

    resolved = resolve_base(base)
    if resolved.gguf is None:
        raise LoramixError(f"llama.cpp runs a GGUF base model; {resolved} is a transformers model")
    return LlamaCpp(resolved.gguf, base, label=str(resolved), **options)


@contextmanager
def gguf_lora(adapter: str | Path, base: str | None, *, allow_pickle: bool = False) -> Iterator[Path]:
    """The PEFT adapter folder `adapter` written as a GGUF LoRA for `base` (checked to fit its shapes), in a temporary
    folder removed after the block."""
    from ..export import export_gguf

    with tempfile.TemporaryDirectory(prefix="loramix-gguf-") as tmp:
        out = Path(tmp) / f"{Path(adapter).name or 'adapter'}.gguf"
        yield export_gguf(adapter, out, base=base, force=True, allow_pickle=allow_pickle)
