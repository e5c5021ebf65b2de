"""The bank index: per-entry signatures and what is derived from them (bank distance matrices, fitted
trained operators), cached under BANK/.loramix/ and keyed by content, so a changed entry is recomputed.

Layout: signatures/<spec key>/<sha256 of train.jsonl>.<checksum>.npy (+ spec.json);
distances/<spec key>.<distance>.<seed>.<entries hash>.<checksum>.npy; operators/<operator>.<...>.safetensors.
Every array file carries the checksum of its bytes in its name: a damaged file is detected, deleted and recomputed."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np

from .adapter import WEIGHTS_FILE
from .bank import Bank, BankEntry
from .distances import distance_matrix, get_distance
from .files import atomic_write_bytes, sha256_file
from .operators import BankFit, Operator, trainable_operator
from .engine import get_engine
from .signatures import SignatureSpec, make_signer


def _store(stem: Path, array: np.ndarray) -> None:
    """Write `array` atomically as <stem>.<first 16 hex of the sha256 of its bytes>.npy; older versions go."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    data = buf.getvalue()
    path = stem.with_name(f"{stem.name}.{hashlib.sha256(data).hexdigest()[:16]}.npy")
    atomic_write_bytes(path, data)
    for old in _versions(stem):
        if old != path:
            old.unlink(missing_ok=True)


def _versions(stem: Path) -> list[Path]:
    return sorted(stem.parent.glob(f"{stem.name}.*.npy")) if stem.parent.is_dir() else []


def _fetch(stem: Path) -> np.ndarray | None:
    """The cached array of `stem` if a version passes its checksum, else None; corrupted versions are deleted."""
    for path in _versions(stem):
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest()[:16] == path.name[len(stem.name) + 1 : -len(".npy")]:
            return np.load(io.BytesIO(data), allow_pickle=False)
        path.unlink(missing_ok=True)
    return None


def _sign(signer, item: tuple) -> np.ndarray:
    return signer(item[1])


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class BankIndex:
    """Cached signatures, distance matrices and trained operators of one bank's usable entries."""

    def __init__(self, bank: Bank):
        self.bank = bank
        self.dir = bank.index_dir

    def resolve(self, spec: SignatureSpec) -> SignatureSpec:
        return spec.resolved(self.bank.base_model)

    def _signature_stem(self, spec: SignatureSpec, entry: BankEntry) -> Path:
        return self.dir / "signatures" / spec.key() / entry.data_hash

    def status(self, spec: SignatureSpec) -> dict[str, bool]:
        """Entry name -> whether its signature for `spec` is cached (entries with data only)."""
        spec = self.resolve(spec)
        return {e.name: bool(_versions(self._signature_stem(spec, e))) for e in self.bank.usable}

    def signatures(self, spec: SignatureSpec, engine: str = "local") -> list[np.ndarray]:
        """Signatures of the bank's usable entries (in `bank.usable` order), computing missing ones on `engine`
        and caching each as soon as it is known."""
        spec = self.resolve(spec)
        folder = self.dir / "signatures" / spec.key()
        meta = folder / "spec.json"
        if not meta.is_file():
            atomic_write_bytes(meta, (json.dumps(asdict(spec), indent=2) + "\n").encode())
        out: list[np.ndarray | None] = [_fetch(self._signature_stem(spec, e)) for e in self.bank.usable]
        missing = [(i, self.bank.usable[i].dataset()) for i, sig in enumerate(out) if sig is None]

        def store(item: tuple, sig: np.ndarray) -> None:
            out[item[0]] = sig
            _store(self._signature_stem(spec, self.bank.usable[item[0]]), sig)

        get_engine(engine).map(_sign, missing, f"signatures ({spec.method})", setup=partial(make_signer, spec), on_result=store)
        return out  # type: ignore[return-value]

    def distance_matrix(self, spec: SignatureSpec, distance: str, seed: int = 0) -> np.ndarray:
        """D[i, j] = distance(entry i, entry j) over usable entries, float64 [n, n], cached."""
        spec = self.resolve(spec)
        revision = get_distance(distance, make_signer(spec).kind).revision
        key = _digest([e.data_hash for e in self.bank.usable])
        stem = self.dir / "distances" / f"{spec.key()}.{distance}-r{revision}.{seed}.{key}"
        cached = _fetch(stem)
        if cached is not None and cached.shape == (len(self.bank.usable),) * 2:
            return cached
        matrix = distance_matrix(distance, self.signatures(spec), seed)
        _store(stem, matrix)
        return matrix

    def fitted_operator(self, name: str, spec: SignatureSpec, distance: str, compose: str, seed: int = 0) -> Operator:
        """The trainable operator `name` fitted on this bank (every usable entry) for composition `compose`, cached."""
        cls = trainable_operator(name)
        spec = self.resolve(spec)
        entries = self.bank.usable
        key = _digest([f"{e.name}:{e.data_hash}:{sha256_file(e.adapter.path / WEIGHTS_FILE)}" for e in entries])
        path = self.dir / "operators" / f"{name}.{spec.key()}.{distance}.{compose}.{seed}.{key}.safetensors"
        if path.is_file():
            try:
                return cls.load(path)
            except Exception:  # a damaged cache file is refitted
                pass
        op = cls().fit_bank(BankFit(self.bank, entries, self.distance_matrix(spec, distance, seed), compose), seed=seed)
        op.save(path)
        return op
