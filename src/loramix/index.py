"""The bank index: per-entry signatures and what is derived from them (bank distance matrices, fitted
neural operators), cached under BANK/.loramix/ and keyed by content, so a changed entry is recomputed.

Layout: signatures/<spec key>/<sha256 of train.jsonl>.npy (+ spec.json);
distances/<spec key>.<distance>.<seed>.<entries hash>.npy; operators/neural.<...>.safetensors."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .adapter import WEIGHTS_FILE
from .bank import Bank, BankEntry
from .distances import distance_matrix, get_distance
from .files import atomic_write_bytes, sha256_file
from .operators import Neural
from .progress import track
from .signatures import SignatureSpec, make_signer


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _load_npy(path: Path) -> np.ndarray | None:
    """The cached array, or None when it is missing or unreadable (then it is recomputed)."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class BankIndex:
    """Cached signatures, distance matrices and neural operators of one bank's usable entries."""

    def __init__(self, bank: Bank):
        self.bank = bank
        self.dir = bank.index_dir

    def resolve(self, spec: SignatureSpec) -> SignatureSpec:
        return spec.resolved(self.bank.base_model)

    def _signature_path(self, spec: SignatureSpec, entry: BankEntry) -> Path:
        return self.dir / "signatures" / spec.key() / f"{entry.data_hash}.npy"

    def status(self, spec: SignatureSpec) -> dict[str, bool]:
        """Entry name -> whether its signature for `spec` is cached (entries with data only)."""
        spec = self.resolve(spec)
        return {e.name: self._signature_path(spec, e).is_file() for e in self.bank.usable}

    def signatures(self, spec: SignatureSpec) -> list[np.ndarray]:
        """Signatures of the bank's usable entries (in `bank.usable` order), computing and caching missing ones."""
        spec = self.resolve(spec)
        folder = self.dir / "signatures" / spec.key()
        meta = folder / "spec.json"
        if not meta.is_file():
            atomic_write_bytes(meta, (json.dumps(asdict(spec), indent=2) + "\n").encode())
        out: list[np.ndarray | None] = [_load_npy(self._signature_path(spec, e)) for e in self.bank.usable]
        missing = [i for i, sig in enumerate(out) if sig is None]
        if missing:
            signer = make_signer(spec)
            for i in track(missing, f"signatures ({spec.method})", total=len(missing)):
                entry = self.bank.usable[i]
                out[i] = signer(entry.dataset())
                _save_npy(self._signature_path(spec, entry), out[i])
        return out  # type: ignore[return-value]

    def distance_matrix(self, spec: SignatureSpec, distance: str, seed: int = 0) -> np.ndarray:
        """D[i, j] = distance(entry i, entry j) over usable entries, float64 [n, n], cached."""
        spec = self.resolve(spec)
        get_distance(distance, make_signer(spec).kind)
        key = _digest([e.data_hash for e in self.bank.usable])
        path = self.dir / "distances" / f"{spec.key()}.{distance}.{seed}.{key}.npy"
        cached = _load_npy(path)
        if cached is not None and cached.shape == (len(self.bank.usable),) * 2:
            return cached
        matrix = distance_matrix(distance, self.signatures(spec), seed)
        _save_npy(path, matrix)
        return matrix

    def neural(self, spec: SignatureSpec, distance: str, space: str, seed: int = 0) -> Neural:
        """The neural operator fitted on this bank (every usable entry), cached with the index."""
        from .compose import gram_matrix

        spec = self.resolve(spec)
        entries = self.bank.usable
        key = _digest([f"{e.name}:{e.data_hash}:{sha256_file(e.adapter.path / WEIGHTS_FILE)}" for e in entries])
        path = self.dir / "operators" / f"neural.{spec.key()}.{distance}.{space}.{seed}.{key}.safetensors"
        if path.is_file():
            try:
                return Neural.load(path)
            except Exception:  # a damaged cache file is refitted
                pass
        op = Neural().fit(self.distance_matrix(spec, distance, seed), gram_matrix(self.bank, entries, space), seed=seed)
        op.save(path)
        return op
