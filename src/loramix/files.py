"""Atomic writes: a file or a folder appears whole under its final name, or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import LoramixError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(path: Path) -> None:
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
        publish(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def parse_json(text: str | bytes, what: str) -> Any:
    """`text` parsed as JSON, or one LoramixError naming `what` for anything that is not (bad syntax, bytes that
    are not UTF-8, nesting deeper than Python's recursion limit, an integer too long to convert)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LoramixError(f"{what}: invalid JSON ({str(e).splitlines()[0][:200]})") from None


def read_json(path: str | Path, what: str | None = None) -> Any:
    """The JSON document in the file `path` (see parse_json); errors name `what` (default: the path)."""
    return parse_json(Path(path).read_bytes(), what or str(path))


def refuse_target(out: str | Path, *, force: bool = False, folder: bool = True,
                  inputs: dict[str, str | Path | None] | None = None) -> None:
    """Refuse an output that atomic_dir (or, not `folder`, a file write) would refuse: one that exists (unless
    `force`), or is not a folder (a file); and one that is, holds or lies inside one of the command's `inputs` (what
    -> path; paths that do not exist, e.g. hub ids, are skipped; a new file may go inside an input folder): replacing
    it would destroy or corrupt what the command reads. Call it before long work, so the user learns at once."""
    out = Path(out)
    if out.exists() and not force:
        raise LoramixError(f"{out}: already exists (use --force to replace it)")
    if out.exists() and out.is_dir() != folder:
        raise LoramixError(f"{out}: exists and is {'not ' if folder else ''}a folder")
    where = out.resolve()
    for what, path in (inputs or {}).items():
        if path is None or not Path(path).exists():
            continue
        source = Path(path).resolve()
        inside = source.is_dir() and where.is_relative_to(source) and (folder or out.exists())  # a new file beside is fine
        if where == source or source.is_relative_to(where) or inside:
            how = "is" if where == source else "holds" if source.is_relative_to(where) else "is inside"
            raise LoramixError(f"{out}: {how} {what} {path}, which this command reads; write the output elsewhere")


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out`; on success rename it to `out`, on failure delete it.

    An existing `out` is refused unless `force`; then it is replaced once the new folder is complete, and only the
    files the new folder writes are replaced: anything else in `out` is carried over (hard-linked) unchanged.
    """
    out = Path(out).absolute()  # '.' or 'x/..' name no folder of their own to write beside
    refuse_target(out, force=force)
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise LoramixError(f"{out}: is the current folder or holds it; write the output to another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = None
    try:
        yield tmp
        publish(tmp)
        if out.exists() and force:
            for item in out.iterdir():
                if not (tmp / item.name).exists():
                    _link_copy(item, tmp / item.name)
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            with contextlib.suppress(FileNotFoundError):  # another run replacing it moved it first
                os.replace(out, old / out.name)
        try:
            os.rename(tmp, out)
        except OSError:
            raise LoramixError(f"{out}: another run wrote it at the same time (its output was kept)") from None
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


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
