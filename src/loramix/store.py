"""The store of what loramix caches, and what names files in its keys.

- `store` / `fetch`: files written as <stem>.<mac>.<ext>, where the HMAC-SHA256 of their name and bytes is taken
  under a key only this user's loramix holds (LORAMIX_HOME/index.key, `index_key`): a damaged file, one copied from
  another file's name, or one made by another user fails the check and is recomputed, never believed.
- `content_hash`: the sha256 of a file's bytes, memoised by the file's identity; `adapter_hash`, `model_identity`:
  an adapter folder and a model by content. No two different contents share a key."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from .errors import LoramixError
from .files import CONFIG_FILE, PICKLE_FILE, WEIGHTS_FILE, atomic_write_bytes, sha256_file
from .paths import loramix_home

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


def listing(folder: Path, ext: str) -> dict[str, list[Path]]:
    """The stored versions (<stem>.<mac>.<ext>) in `folder` by stem name, sorted, from one scan: for fetching many
    stems of one folder (`fetch(..., versions=...)`) without a scan per stem."""
    out: dict[str, list[Path]] = {}
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.name.endswith(f".{ext}"):
                stem, _, mac = path.name[: -len(ext) - 1].rpartition(".")
                if stem and mac:
                    out.setdefault(stem, []).append(path)
    return out


def stored_versions(stem: Path, ext: str) -> list[Path]:
    return listing(stem.parent, ext).get(stem.name, [])


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
    for old in stored_versions(stem, ext):
        if old != path:
            old.unlink(missing_ok=True)


def fetch(stem: Path, ext: str, versions: list[Path] | None = None) -> bytes | None:
    """The bytes stored for `stem` if a version passes its HMAC, else None; versions that fail it are deleted.
    `versions`: the stem's files as `listing` found them (default: looked up now)."""
    for path in stored_versions(stem, ext) if versions is None else versions:
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


def _digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


HASHES_DIR = "hashes"  # LORAMIX_HOME/hashes: content hashes of files, memoised by their identity (content_hash)
_RACY_NS = 2_000_000_000  # a file changed this recently may change again within its timestamps' granularity
_HASHES: dict[tuple, str] = {}  # this process's memo: identity -> sha256


def _file_identity(path: Path) -> tuple:
    """What tells one version of a file from another without reading it: its resolved path, device, inode, size,
    modification and status-change times (ns). A copy (even with preserved times: tar, cp -p, rsync -t) has another
    path or inode, and a rewrite in place, even one that restores the modification time (os.utime), a new ctime."""
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def content_hash(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes: the only thing a cache key names a file by. The hash is memoised by the file's
    identity (`_file_identity`; in this process, and across runs in LORAMIX_HOME/hashes under the index key's HMAC),
    so an unchanged file is read once; a file changed in the last 2 s, or while it was read, is not memoised (its
    timestamps could not tell the next change from this one)."""
    path = Path(path)
    ident = _file_identity(path)
    if (known := _HASHES.get(ident)) is not None:
        return known
    root = loramix_home() / HASHES_DIR
    name = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]
    stem = root / name[:2] / name[2:]  # 256 folders: a look-up lists one
    data = fetch(stem, "json")
    try:
        stored = None if data is None else json.loads(data)
    except ValueError:
        stored = None
    if isinstance(stored, list) and len(stored) == 2 and stored[0] == list(ident) and isinstance(stored[1], str):
        _HASHES[ident] = stored[1]
        return stored[1]
    digest = sha256_file(path)
    import time

    if _file_identity(path) == ident and time.time_ns() - max(ident[4], ident[5]) > _RACY_NS:
        _HASHES[ident] = digest
        try:
            store(root, stem, json.dumps([list(ident), digest]).encode(), "json")
        except (OSError, LoramixError):  # a read-only or full LORAMIX_HOME: the hash is only not kept
            pass
    return digest


def adapter_hash(folder: str | Path) -> str:
    """The content hash of an adapter folder: the sha256 of every file loramix or PEFT reads of it (adapter_config.json,
    adapter_model.safetensors, adapter_model.bin, by name and content). Two adapters with different bytes never share
    it, whatever their sizes and times."""
    folder = Path(folder)
    parts = [f"{name}:{content_hash(folder / name) if (folder / name).is_file() else '-'}"
             for name in (CONFIG_FILE, WEIGHTS_FILE, PICKLE_FILE)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def model_identity(name: str | None) -> str | None:
    """What names a base (or embedding) model in a cache key, by content: a local file (a GGUF) by its sha256; a local
    folder by the sha256 of each of its files (config, weights, tokenizer, chat template); a hub id by the commit of
    its snapshot in the local hub cache (a commit names its content), else by the id alone (not downloaded yet);
    None for None."""
    if name is None:
        return None
    path = Path(name).expanduser()
    if path.is_file():
        return f"file:{content_hash(path)}"
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        return "folder:" + _digest([f"{p.relative_to(path).as_posix()}:{content_hash(p)}" for p in files])
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(name), "config.json")
    except Exception:  # not a valid repo id, or no hub cache: named as given
        cached = None
    return f"hub:{name}@{Path(cached).parent.name}" if isinstance(cached, str) else f"hub:{name}"
