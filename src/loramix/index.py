"""The bank index: per-entry signatures and what is derived from them (bank distance matrices, fitted
trained operators, calibrations), cached under BANK/.loramix/ and keyed by content, so a changed entry is recomputed.

Layout: signatures/<spec key>/<sha256 of train.jsonl>.<mac>.npy (+ spec.<mac>.json);
distances/<spec key>.<distance>.<seed>.<entries hash>.<mac>.npy; operators/<operator>.<...>.<mac>.safetensors;
calibration/<key>.<mac>.json. Every file carries in its name an HMAC-SHA256 of its name and bytes under a key that
only this user's loramix holds (LORAMIX_HOME/index.key): a damaged file, one copied from another file's name, or an
index shipped with a downloaded bank (whoever made it had another key) fails the check and is recomputed, never
believed. Nothing is written outside the index folder (a link inside it that leads out is refused)."""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .arguments import checked
from .bank import Bank, BankEntry
from .data import Dataset, Sample
from .distances import distance_matrix, distance_row, get_distance
from .errors import LoramixError
from .operators import BankFit, Operator, trainable_operator
from .engine import get_engine
from .runtime import base_identity
from .store import _digest, adapter_hash, fetch, listing, model_identity, store, stored_versions
from .probes import ProbeSet
from .signatures import SignatureSpec, make_signer
from .signing import SigningMode, signing_mode


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _answers(entry: BankEntry, rows: list) -> Dataset:
    """An entry's probe answers [[prompt, answer], ...] as a Dataset."""
    return Dataset([Sample(i, (o,)) for i, o in rows], f"{entry.name} (probe answers)")


def _probe_worker(bank: str, allow_pickle: bool, prompts: list[str], base: str | None, runtime: str) -> tuple:
    """An engine worker's state for probe answers: the bank, the prompts, and `base` loaded on `runtime` to answer
    them (probes.open_answerer)."""
    from .probes import open_answerer

    return Bank(bank, allow_pickle=allow_pickle), prompts, open_answerer(base, runtime)


def _probe_answer(state: tuple, i: int) -> list:
    """Entry i's answers to the probe prompts, [[prompt, answer], ...]."""
    bank, prompts, answer = state
    return [[s.input, s.output] for s in answer(bank, bank.entries[i], prompts).samples]


def _sign(signer, item: tuple) -> np.ndarray:
    return signer(item[1])


class BankIndex:
    """Cached signatures, distance matrices and trained operators of one bank's usable entries."""

    @checked
    def __init__(self, bank: Bank):
        self.bank = bank
        self.dir = bank.index_dir
        self._spec_keys: dict[SignatureSpec, str] = {}

    def array(self, stem: Path, versions: list[Path] | None = None) -> np.ndarray | None:
        """The array stored for `stem` (a path inside the index), None when none passes its HMAC (`versions`: see
        `fetch`)."""
        data = fetch(stem, "npy", versions)
        return None if data is None else np.load(io.BytesIO(data), allow_pickle=False)

    def resolve(self, spec: SignatureSpec) -> SignatureSpec:
        return spec.resolved(self.bank.base_model)

    def spec_key(self, spec: SignatureSpec) -> str:
        """The cache key of signatures of `spec` (resolved): its settings and code version (`SignatureSpec.key`) and
        the content of the model that computes them (the base: `base_identity`; an embedder: `model_identity` of the
        folder it loads), so a model replaced under the same name or path never reuses another's signatures."""
        from .encoder import embedder_path
        from .signatures import SIGNATURES

        if spec not in self._spec_keys:
            if spec.model is None:
                ident = None
            elif SIGNATURES.get(spec.method).needs_base:
                ident = base_identity(spec.model)
            else:
                ident = model_identity(embedder_path(spec.model))
            self._spec_keys[spec] = f"{spec.key()}-{_digest([str(ident)])[:12]}"
        return self._spec_keys[spec]

    def _signature_stem(self, spec: SignatureSpec, entry: BankEntry) -> Path:
        return self.dir / "signatures" / self.spec_key(spec) / entry.data_hash

    def status(self, spec: SignatureSpec) -> dict[str, bool]:
        """Entry name -> whether its signature for `spec` is cached (entries with data only)."""
        spec = self.resolve(spec)
        return {e.name: fetch(self._signature_stem(spec, e), "npy") is not None for e in self.bank.usable}

    @checked
    def signatures(self, spec: SignatureSpec, engine: str = "local") -> list[np.ndarray]:
        """Signatures of the bank's usable entries (in `bank.usable` order) from their train.jsonl, computing missing
        ones on `engine` and caching each as soon as it is known."""
        return self._signed(spec, [(e.data_hash, e.dataset) for e in self.bank.usable], engine)

    def probe_signatures(self, spec: SignatureSpec, probes: ProbeSet, engine: str = "local", *, model: Any = None,
                         tokenizer: Any = None, base: Any = None, base_name: str | None = None,
                         runtime: str = "auto") -> list[np.ndarray]:
        """Signatures of every entry (in `bank.entries` order) from its answers to `probes` (`probe_datasets`, its
        missing answers and the signatures computed on `engine`)."""
        answers = self.probe_datasets(probes, model=model, tokenizer=tokenizer, base=base, base_name=base_name,
                                      runtime=runtime, engine=engine)
        return self._answers_signed(spec, answers, engine)

    def _answers_signed(self, spec: SignatureSpec, answers: list[Dataset], engine: str = "local") -> list[np.ndarray]:
        """The signatures of datasets already in memory (`probe_datasets`' answers), cached under their content."""
        return self._signed(spec, [(d.fingerprint(), partial(lambda d: d, d)) for d in answers], engine)

    def _signed(self, spec: SignatureSpec, items: list[tuple[str, Callable[[], Dataset]]], engine: str) -> list[np.ndarray]:
        """The signature of each (content hash, dataset loader) in `items`, cached under the hash."""
        spec = self.resolve(spec)
        folder = self.dir / "signatures" / self.spec_key(spec)
        if fetch(folder / "spec", "json") is None:  # the spec, for people reading the folder; nothing reads it
            store(self.dir, folder / "spec", (json.dumps(asdict(spec), indent=2) + "\n").encode(), "json")
        stored = listing(folder, "npy")
        out: list[np.ndarray | None] = [self.array(folder / key, stored.get(key, [])) for key, _ in items]
        missing = [(i, items[i][1]()) for i, sig in enumerate(out) if sig is None]

        def keep(item: tuple, sig: np.ndarray) -> None:
            out[item[0]] = sig
            store(self.dir, folder / items[item[0]][0], _npy(sig), "npy")

        get_engine(engine).map(_sign, missing, f"signatures ({spec.method})", setup=partial(make_signer, spec), on_result=keep)
        return out  # type: ignore[return-value]

    def probe_datasets(self, probes: ProbeSet, *, model: Any = None, tokenizer: Any = None, base: Any = None,
                       base_name: str | None = None, runtime: str = "auto", engine: str = "local") -> list[Dataset]:
        """Every entry's answers to `probes` (in `bank.entries` order; `probes.answer_probes`), cached per probe set,
        base model (by content: `model_identity`), runtime and adapter (the sha256 of its files: `adapter_hash`). The missing ones are answered by a
        base already loaded (`model` and `tokenizer` on PyTorch, or `base`, a runtime.llamacpp.LlamaCpp), else by
        `base_name` (default the bank's) on `runtime`, loaded only when an answer is missing: in this process on the
        local engine, once per worker on another (`engine`: each answer stored as soon as it is known, so a rerun
        resumes; on PyTorch, a GPU per worker where the cluster has them). llama.cpp's answers are cached apart from
        PyTorch's."""
        from .probes import answer_probes, answer_probes_llamacpp
        from .runtime import choose_runtime, resolve_base

        name = base_name if base_name is not None else self.bank.base_model
        folder = self.dir / "probes" / self._probes_key(probes, base, model, name, runtime)
        stems = [folder / _digest([adapter_hash(e.adapter.path)]) for e in self.bank.entries]
        stored = listing(folder, "json")
        out: list[Dataset | None] = []
        for entry, stem in zip(self.bank.entries, stems):
            data = fetch(stem, "json", stored.get(stem.name, []))
            try:
                out.append(None if data is None else _answers(entry, json.loads(data)))
            except (ValueError, TypeError, LoramixError):  # a form this version does not read: recomputed
                out.append(None)
        missing = [i for i, d in enumerate(out) if d is None]
        if not missing:
            return out  # type: ignore[return-value]
        if name is None:
            raise LoramixError(f"{self.bank.path}: the bank names no base model, so its entries cannot answer probe prompts")

        def keep(i: int, rows: list) -> None:
            out[i] = _answers(self.bank.entries[i], rows)
            store(self.dir, stems[i], json.dumps(rows, ensure_ascii=False).encode(), "json")

        if base is not None or model is not None:  # in this process, on the base already loaded
            loaded = partial(answer_probes_llamacpp, base) if base is not None else partial(answer_probes, model, tokenizer)
            engine, setup = "local", lambda: (self.bank, probes.prompts, loaded)
            gpus = 0.0
        else:  # a base per worker, and a GPU per worker on PyTorch where the cluster has them
            setup = partial(_probe_worker, str(self.bank.path), self.bank.allow_pickle, probes.prompts, name, runtime)
            gpus = 0.0 if choose_runtime(resolve_base(name), runtime) == "llama.cpp" else 1.0
        get_engine(engine).map(_probe_answer, missing, f"probe answers ({len(probes.prompts)} prompts)", setup=setup,
                               on_result=keep, gpus=gpus)
        return out  # type: ignore[return-value]

    def _probes_key(self, probes: ProbeSet, base: Any, model: Any, name: str | None, runtime: str) -> str:
        """The probe answers' cache key: the probe set, the base that answers (`name`, the bank's unless another was
        given, by its content: `base_identity`), and what runs it (`base`, a LlamaCpp; else `model` on PyTorch, loaded
        from `name`; else `name` on `runtime`: a GGUF on llama.cpp is named by its content)."""
        from .runtime import runtime_identity

        identity = base.identity if base is not None else None if model is not None else runtime_identity(name, runtime)
        return probes.key(None if name is None else base_identity(name), identity)

    def entry_gguf(self, entry: BankEntry, base: Any) -> Path:
        """`entry`'s adapter as a GGUF LoRA for `base` (a runtime.llamacpp.LlamaCpp), written once and kept in the
        index under the sha256 of the adapter's files and the base's identity (so no two adapters, nor two bases,
        share one)."""
        from .runtime.llamacpp import gguf_lora

        stem = self.dir / "gguf" / f"{entry.name}-{_digest([base.identity, adapter_hash(entry.adapter.path)])}"
        if fetch(stem, "gguf") is None:
            with gguf_lora(entry.adapter.path, base.base, allow_pickle=self.bank.allow_pickle) as made:
                store(self.dir, stem, made.read_bytes(), "gguf")
        return stored_versions(stem, "gguf")[0]

    def mode(self, name: str) -> SigningMode:
        """The entry-signing mode `name` names for this bank (`signing.signing_mode`: 'auto' chooses one)."""
        return signing_mode(self.bank, name)

    def weighted(self, mode: str) -> list[BankEntry]:
        """The entries that get coefficients under `mode`."""
        return self.mode(mode).weighted(self.bank)

    def distance_row(self, spec: SignatureSpec, distance: str, user: np.ndarray, mode: str, probes: ProbeSet,
                     seed: int = 0, *, model: Any = None, tokenizer: Any = None, base: Any = None,
                     base_name: str | None = None) -> np.ndarray:
        """d(user signature, entry) over `weighted(mode)`, float64 [n] (SigningMode.row); probe answers, where the mode
        uses them, from `model` (PyTorch) or `base` (llama.cpp), the base `base_name` (default the bank's), as
        probe_datasets."""
        return self.mode(mode).row(self, spec, distance, user, seed, partial(
            self.probe_signatures, spec, probes, model=model, tokenizer=tokenizer, base=base, base_name=base_name))

    def distance_matrix(self, spec: SignatureSpec, distance: str, seed: int = 0, mode: str = "data",
                        probes: ProbeSet | None = None, base_name: str | None = None, runtime: str = "auto") -> np.ndarray:
        """D[i, j] = distance(usable entry i's data, entry j of `weighted(mode)`), float64 [usable, weighted]
        (SigningMode.matrix, from the usable entries' data matrix and, where the mode uses them, the matrix to every
        entry's probe answers). Both cached."""
        spec, signing = self.resolve(spec), self.mode(mode)
        revision = get_distance(distance, make_signer(spec).kind).revision
        key = _digest([e.data_hash for e in self.bank.usable])
        stem = self.dir / "distances" / f"{self.spec_key(spec)}.{distance}-r{revision}.{seed}.{key}"
        data = self.array(stem)
        if data is None or data.shape != (len(self.bank.usable),) * 2:
            data = distance_matrix(distance, self.signatures(spec), seed)
            store(self.dir, stem, _npy(data), "npy")

        def cross() -> np.ndarray:  # [usable, entries]: the usable entries' data to every entry's probe answers
            if probes is None:
                raise LoramixError("distance_matrix(): a mode that signs entries by probe answers needs `probes`")
            answers = self.probe_datasets(probes, base_name=base_name, runtime=runtime)
            name = base_name if base_name is not None else self.bank.base_model
            pkey = self._probes_key(probes, None, None, name, runtime)
            pstem = stem.with_name(f"{stem.name}.{pkey}.{_digest([d.fingerprint() for d in answers])}")
            matrix = self.array(pstem)
            if matrix is None or matrix.shape != (len(self.bank.usable), len(self.bank.entries)):
                columns = self._answers_signed(spec, answers)
                matrix = np.stack([distance_row(distance, s, columns, seed) for s in self.signatures(spec)])
                store(self.dir, pstem, _npy(matrix), "npy")
            return matrix

        return signing.matrix(self, spec, distance, seed, data, cross)

    def fitted_operator(self, name: str, spec: SignatureSpec, distance: str, compose: str, seed: int = 0,
                        options: dict[str, float] | None = None) -> Operator:
        """The trainable operator `name` fitted on this bank (every usable entry) for composition `compose`, its
        declared parameters set from `options` (Operator.configured), cached."""
        cls = trainable_operator(name)
        spec = self.resolve(spec)
        entries = self.bank.usable
        key = _digest([f"{e.name}:{e.data_hash}:{adapter_hash(e.adapter.path)}" for e in entries])
        if options:  # the defaults keep the key they always had
            key += "." + _digest([json.dumps(options, sort_keys=True)])[:12]
        stem = self.dir / "operators" / f"{name}.{self.spec_key(spec)}.{distance}.{compose}.{seed}.{key}"
        if (data := fetch(stem, "safetensors")) is not None:
            try:
                return cls.from_bytes(data)
            except Exception:  # a form this version (or this operator class) does not read: refitted
                pass
        op = cls().configured(options).fit_bank(BankFit(self.bank, entries, self.distance_matrix(spec, distance, seed),
                                                        compose), seed=seed)
        store(self.dir, stem, op.to_bytes(), "safetensors")
        return op
