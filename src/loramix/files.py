"""Atomic writes: a file or a folder appears whole under its final name, or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import LoramixError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(path: Path) -> None:
    """Give a file made by tempfile (mode 0600/0700) the ordinary permissions: 0666/0777 less the umask."""
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~_umask())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def refuse_target(out: str | Path, *, force: bool = False) -> None:
    """Refuse an output folder that atomic_dir would refuse: one that exists (unless `force`), or is not a folder. Call
    it before long work, so the user learns at once."""
    out = Path(out)
    if out.exists() and not force:
        raise LoramixError(f"{out}: already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise LoramixError(f"{out}: exists and is not a folder")


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out`; on success rename it to `out`, on failure delete it.

    An existing `out` is refused unless `force`; then it is replaced once the new folder is complete, and only the
    files the new folder writes are replaced: anything else in `out` is carried over (hard-linked) unchanged.
    """
    out = Path(out)
    refuse_target(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        _publish(tmp)
        if out.exists() and force:
            for item in out.iterdir():
                if not (tmp / item.name).exists():
                    _link_copy(item, tmp / item.name)
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, out)
            except OSError:
                raise LoramixError(f"{out}: already exists (another run wrote it first)") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _link_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` (a file or a folder tree) at `dst`, copying where links are impossible."""
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src: str | Path, dst: str | Path) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
