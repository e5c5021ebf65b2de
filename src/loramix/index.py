"""The bank index: per-entry signatures and what is derived from them (bank distance matrices, fitted
trained operators, calibrations), cached under BANK/.loramix/ and keyed by content, so a changed entry is recomputed.

Layout: signatures/<spec key>/<sha256 of train.jsonl>.<mac>.npy (+ spec.<mac>.json);
distances/<spec key>.<distance>.<seed>.<entries hash>.<mac>.npy; operators/<operator>.<...>.<mac>.safetensors;
calibration/<key>.<mac>.json. Every file carries in its name an HMAC-SHA256 of its name and bytes under a key that
only this user's loramix holds (LORAMIX_HOME/index.key): a damaged file, one copied from another file's name, or an
index shipped with a downloaded bank (whoever made it had another key) fails the check and is recomputed, never
believed. Nothing is written outside the index folder (a link inside it that leads out is refused)."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import secrets
import shutil
import tempfile
from dataclasses import asdict
from functools import lru_cache, partial
from pathlib import Path

import numpy as np

from .adapter import WEIGHTS_FILE
from .bank import Bank, BankEntry
from .distances import distance_matrix, get_distance
from .errors import LoramixError
from .files import atomic_write_bytes, sha256_file
from .operators import BankFit, Operator, trainable_operator
from .engine import get_engine
from .paths import loramix_home
from .signatures import SignatureSpec, make_signer

KEY_FILE = "index.key"
_KEY_BYTES = 32


def index_key() -> bytes:
    """This user's secret index key (LORAMIX_HOME/index.key, 32 random bytes, mode 0600), created on first use;
    two processes creating it at once agree on one (the first link wins)."""
    return _index_key(loramix_home() / KEY_FILE)


@lru_cache(maxsize=4)
def _index_key(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(_KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:  # another process made it first: use theirs
                pass
        finally:
            os.unlink(tmp)
    if not path.is_file():  # a folder, a FIFO, a device: reading it could block forever
        raise LoramixError(f"{path}: not a regular file; remove it (every bank index is then recomputed once)")
    key = path.read_bytes()
    if len(key) != _KEY_BYTES:
        raise LoramixError(f"{path}: not a loramix index key ({len(key)} bytes, not {_KEY_BYTES}); remove it "
                           "(every bank index is then recomputed once)")
    return key


def _mac(name: str, data: bytes) -> str:
    return hmac.new(index_key(), name.encode() + b"\0" + data, hashlib.sha256).hexdigest()[:32]


def _versions(stem: Path, ext: str) -> list[Path]:
    return sorted(stem.parent.glob(f"{stem.name}.*.{ext}")) if stem.parent.is_dir() else []


def store(root: Path, stem: Path, data: bytes, ext: str) -> None:
    """Write `data` atomically as <stem>.<mac>.<ext> (`stem` inside the index folder `root`); older versions go.
    A path whose folder resolves outside `root` (through a link) is refused."""
    parent = stem.parent
    if not parent.resolve().is_relative_to(root.resolve()):  # resolve() follows the links of the part that exists
        raise LoramixError(f"{parent}: leads outside the bank index {root} (a link?); loramix writes only inside it")
    for folder in [parent, *parent.parents]:  # a file where one of the index's folders belongs: removed
        if folder == root or not folder.is_relative_to(root):
            break
        if folder.exists() and not folder.is_dir():
            folder.unlink()
    parent.mkdir(parents=True, exist_ok=True)
    path = stem.with_name(f"{stem.name}.{_mac(stem.name, data)}.{ext}")
    atomic_write_bytes(path, data)
    for old in _versions(stem, ext):
        if old != path:
            old.unlink(missing_ok=True)


def fetch(stem: Path, ext: str) -> bytes | None:
    """The bytes stored for `stem` if a version passes its HMAC, else None; versions that fail it are deleted."""
    for path in _versions(stem, ext):
        if not path.is_file() or path.is_symlink():  # not what store writes: removed like a damaged file
            _remove(path)
            continue
        data = path.read_bytes()
        if hmac.compare_digest(_mac(stem.name, data), path.name[len(stem.name) + 1 : -len(ext) - 1]):
            return data
        path.unlink(missing_ok=True)
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _sign(signer, item: tuple) -> np.ndarray:
    return signer(item[1])


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class BankIndex:
    """Cached signatures, distance matrices and trained operators of one bank's usable entries."""

    def __init__(self, bank: Bank):
        self.bank = bank
        self.dir = bank.index_dir

    def array(self, stem: Path) -> np.ndarray | None:
        """The array stored for `stem` (a path inside the index), None when none passes its HMAC."""
        data = fetch(stem, "npy")
        return None if data is None else np.load(io.BytesIO(data), allow_pickle=False)

    def resolve(self, spec: SignatureSpec) -> SignatureSpec:
        return spec.resolved(self.bank.base_model)

    def _signature_stem(self, spec: SignatureSpec, entry: BankEntry) -> Path:
        return self.dir / "signatures" / spec.key() / entry.data_hash

    def status(self, spec: SignatureSpec) -> dict[str, bool]:
        """Entry name -> whether its signature for `spec` is cached (entries with data only)."""
        spec = self.resolve(spec)
        return {e.name: fetch(self._signature_stem(spec, e), "npy") is not None for e in self.bank.usable}

    def signatures(self, spec: SignatureSpec, engine: str = "local") -> list[np.ndarray]:
        """Signatures of the bank's usable entries (in `bank.usable` order), computing missing ones on `engine`
        and caching each as soon as it is known."""
        spec = self.resolve(spec)
        folder = self.dir / "signatures" / spec.key()
        if fetch(folder / "spec", "json") is None:  # the spec, for people reading the folder; nothing reads it
            store(self.dir, folder / "spec", (json.dumps(asdict(spec), indent=2) + "\n").encode(), "json")
        out: list[np.ndarray | None] = [self.array(self._signature_stem(spec, e)) for e in self.bank.usable]
        missing = [(i, self.bank.usable[i].dataset()) for i, sig in enumerate(out) if sig is None]

        def keep(item: tuple, sig: np.ndarray) -> None:
            out[item[0]] = sig
            store(self.dir, self._signature_stem(spec, self.bank.usable[item[0]]), _npy(sig), "npy")

        get_engine(engine).map(_sign, missing, f"signatures ({spec.method})", setup=partial(make_signer, spec), on_result=keep)
        return out  # type: ignore[return-value]

    def distance_matrix(self, spec: SignatureSpec, distance: str, seed: int = 0) -> np.ndarray:
        """D[i, j] = distance(entry i, entry j) over usable entries, float64 [n, n], cached."""
        spec = self.resolve(spec)
        revision = get_distance(distance, make_signer(spec).kind).revision
        key = _digest([e.data_hash for e in self.bank.usable])
        stem = self.dir / "distances" / f"{spec.key()}.{distance}-r{revision}.{seed}.{key}"
        cached = self.array(stem)
        if cached is not None and cached.shape == (len(self.bank.usable),) * 2:
            return cached
        matrix = distance_matrix(distance, self.signatures(spec), seed)
        store(self.dir, stem, _npy(matrix), "npy")
        return matrix

    def fitted_operator(self, name: str, spec: SignatureSpec, distance: str, compose: str, seed: int = 0) -> Operator:
        """The trainable operator `name` fitted on this bank (every usable entry) for composition `compose`, cached."""
        cls = trainable_operator(name)
        spec = self.resolve(spec)
        entries = self.bank.usable
        key = _digest([f"{e.name}:{e.data_hash}:{sha256_file(e.adapter.path / WEIGHTS_FILE)}" for e in entries])
        stem = self.dir / "operators" / f"{name}.{spec.key()}.{distance}.{compose}.{seed}.{key}"
        if (data := fetch(stem, "safetensors")) is not None:
            try:
                return cls.from_bytes(data)
            except Exception:  # a form this version (or this operator class) does not read: refitted
                pass
        op = cls().fit_bank(BankFit(self.bank, entries, self.distance_matrix(spec, distance, seed), compose), seed=seed)
        store(self.dir, stem, op.to_bytes(), "safetensors")
        return op
