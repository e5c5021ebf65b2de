"""Atomic writes: a file or a folder appears whole under its final name, or not at all."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import LoramixError, setting


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(path: Path) -> None:
    """Give a file made by tempfile (mode 0600/0700) the ordinary permissions: 0666/0777 less the umask."""
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~_umask())


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """A storage error raised inside that names no file (a full disk on write, flush or fsync, a quota, a read-only
    or failing disk: _STORAGE_ERRORS) is raised again naming `path`, the file or folder being written, so that its
    message is `<strerror>: <path>`. Other OSErrors (a network error is one) pass as they are."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno in _STORAGE_ERRORS:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise


_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    with naming(path):
        _atomic_write_bytes(path, data)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{hidden_stem(path.name)}.", suffix=".tmp")
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


_STEM_BYTES = 200  # of an output's name kept in the hidden temporary names beside it (a name has at most 255 bytes)


def hidden_stem(name: str) -> str:
    """`name` as the hidden temporary names of its writes carry it: itself when short enough that they fit the file
    system's 255 bytes, else its first characters and a digest of the whole (an output named with 240 bytes is
    written, not refused as 'File name too long' naming a temporary file)."""
    if len(os.fsencode(name)) <= _STEM_BYTES:
        return name
    cut = name[:_STEM_BYTES]
    while len(os.fsencode(cut)) > _STEM_BYTES - 13:
        cut = cut[:-1]
    return f"{cut}~{hashlib.sha256(os.fsencode(name)).hexdigest()[:12]}"


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


Inputs = dict[str, "str | Path | Sequence[str | Path] | None"]  # what -> the path(s) a command reads


def refuse_target(out: str | Path, *, force: bool = False, folder: bool = True, inputs: Inputs | None = None) -> None:
    """The one check of every path loramix writes (a command's output, a bank entry it adds, predictions): refuse an
    output that atomic_dir (or, not `folder`, a file write) would refuse: one that exists (unless `force`), or is not
    a folder (a file); and one that is, holds or lies inside one of the command's `inputs` (what -> a path or a list of
    paths: the data, the bank, the adapter, the base model's files (`base_paths`); paths that do not exist, e.g. hub
    ids not downloaded, are skipped). Nothing may go inside an input, not even a new file: a new chat_template.jinja or
    generation_config.json in a base model's folder changes what it is. An existing output that is a hard link to an
    input file counts as that input. Call it before long work, so the user learns at once; it writes nothing."""
    out = Path(out)
    if out.exists() and not force:
        raise LoramixError(f"{out}: already exists (use {setting('force', True)} to replace it)")
    if out.exists() and out.is_dir() != folder:
        raise LoramixError(f"{out}: exists and is {'not ' if folder else ''}a folder")
    where = out.resolve()
    for what, value in (inputs or {}).items():
        for path in _as_paths(value):
            if not os.path.lexists(path):
                continue
            source = Path(path).resolve()
            if where == source or _links_into(out, source):
                how = "is"
            elif source.is_relative_to(where):
                how = "holds"
            elif where.is_relative_to(source):
                how = "is inside"
            else:
                continue
            raise LoramixError(f"{out}: {how} {what} {path}, which this command reads; write the output elsewhere")
    for parent in out.absolute().parents:  # the nearest that exists must be a folder (else mkdir says 'File exists')
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise LoramixError(f"{out}: {parent} is a file, not a folder, so nothing can be written inside it")
            break


def _as_paths(value: Any) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value if v is not None]


def _links_into(out: Path, source: Path) -> bool:
    """Whether the existing file `out` is a hard link of the file `source` or of a file inside the folder `source`
    (looked for only when `out` has other links)."""
    try:
        st = out.stat()
    except OSError:  # `out` does not exist (yet)
        return False
    if not out.is_file() or st.st_nlink < 2:
        return False
    if source.is_file():
        return os.path.samefile(out, source)
    for folder, _, names in os.walk(source):
        for name in names:
            with contextlib.suppress(OSError):
                other = os.stat(os.path.join(folder, name), follow_symlinks=False)
                if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                    return True
    return False


CONFIG_FILE = "adapter_config.json"  # a PEFT adapter folder's files
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

# What loramix writes that says what an adapter is and how it was made: replaced together, never carried over from
# the output a --force run replaces (`train --force` over a composed adapter must not keep its loramix.json).
ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "loramix.json",
                           "training.json"})


@contextlib.contextmanager
def atomic_dir(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out`; on success rename it to `out`, on failure delete it.

    An existing `out` is refused unless `force`; then it is replaced once the new folder is complete, and only the
    files the new folder writes are replaced: anything else in `out` is carried over (hard-linked) unchanged, but the
    files that describe an adapter (ADAPTER_FILES: a loramix.json or training.json of the adapter replaced would
    describe the new one wrongly).
    """
    out = Path(out).absolute()  # '.' or 'x/..' name no folder of their own to write beside
    refuse_target(out, force=force)
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise LoramixError(f"{out}: is the current folder or holds it; write the output to another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    clear_leftovers(out.parent, out.name)
    tmp, held = _owned_dir(out, ".tmp")
    old = None
    try:
        with naming(out):  # a write inside that fails for want of space names the output
            yield tmp
        publish(tmp)
        if out.exists() and force:
            for item in out.iterdir():
                if not (tmp / item.name).exists() and item.name not in ADAPTER_FILES:
                    _link_copy(item, tmp / item.name)
            old, held_old = _owned_dir(out, ".old")
            held += held_old
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
        for fd in held:
            os.close(fd)


# A hidden folder a run writes beside its output `out`: .<out>.<pid>-<random>.tmp (the output being written) or
# .<out>.<pid>-<random>.old (the output it replaces, for the instant of the swap). The run holds a lock on it while
# alive (`_owned_dir`); one left by a run that died (SIGKILL, a power cut) is cleared by the next (`clear_leftovers`).
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-[A-Za-z0-9_]+\.(?P<kind>tmp|old)")


def _owned_dir(out: Path, suffix: str) -> tuple[Path, list[int]]:
    """A fresh hidden folder beside `out` named by this process, and [an open descriptor holding its lock]."""
    path = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{hidden_stem(out.name)}.{os.getpid()}-", suffix=suffix))
    fd = _lock(path)
    return path, [fd] if fd is not None else []


def _lock(path: Path, *, wait: bool = False) -> int | None:
    """An open descriptor on the folder `path` holding an exclusive flock on it (released by the kernel when this
    process dies, however); BlockingIOError where another process holds it (unless `wait`); None where the system has
    no flock (the descriptor alone where the file system refuses it)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: process ids alone tell a dead run's leftovers
        return None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
            os.close(fd)
            raise BlockingIOError(e.errno, "locked") from None
        return fd  # a file system without flock (some network mounts): the process ids decide alone
    return fd


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def clear_leftovers(folder: Path, name: str | None = None) -> list[str]:
    """Remove from `folder` what runs that died while writing one of its outputs (`name`, default any) left: their
    hidden .tmp folders (a partial output) and .old folders (a replaced output; put back as `name` when a run died
    between moving it aside and renaming the new one in, so `name` is missing). A folder is a dead run's only when its
    process is gone and nothing holds its lock (a live run in another process namespace does). Returns the names of
    the folders cleared."""
    cleared = []
    try:
        candidates = sorted(folder.iterdir())
    except OSError:
        return cleared
    for path in candidates:
        m = _LEFTOVER.fullmatch(path.name)
        if not m or (name is not None and m["name"] != hidden_stem(name)) or path.is_symlink() or not path.is_dir():
            continue
        if _alive(int(m["pid"])):
            continue
        try:
            fd = _lock(path)
        except BlockingIOError:
            continue  # held: a live run (another pid namespace)
        except OSError:  # gone already (another run cleared it)
            continue
        try:
            # the output the dead run had moved aside (under its full name: the folder's name may be its stem), put back
            with contextlib.suppress(OSError):
                kept = [p for p in path.iterdir() if hidden_stem(p.name) == m["name"]] if m["kind"] == "old" else []
                if len(kept) == 1 and kept[0].is_dir() and not os.path.lexists(folder / kept[0].name):
                    os.rename(kept[0], folder / kept[0].name)
            shutil.rmtree(path, ignore_errors=True)
            cleared.append(path.name)
        finally:
            if fd is not None:
                os.close(fd)
    return cleared


@contextlib.contextmanager
def locked_folder(folder: str | Path, what: str = "folder", *, timeout: float = 120.0) -> Iterator[Path]:
    """Create `folder` if missing and hold an exclusive lock on it for the block (a flock on the folder itself: no
    file is written; the kernel releases it when the process dies, however), so that runs writing into it one after
    another (`bank add`, `bank pull`) each see what the others wrote. A run that waits `timeout` seconds for another
    is refused in one line. A folder this call created and left empty is removed when the block fails."""
    import time

    folder = Path(folder)
    if os.path.lexists(folder) and not folder.is_dir():
        raise LoramixError(f"{folder}: is a file, not a {what} folder")
    deadline = time.monotonic() + timeout
    while True:
        try:
            folder.mkdir(parents=True)
            created = True
        except FileExistsError:
            created = False
        try:
            fd = _lock(folder)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise LoramixError(f"{folder}: another loramix run has been writing to this {what} for {timeout:.0f} s; "
                                   "try again when it is done") from None
            time.sleep(0.05)
            continue
        except FileNotFoundError:  # removed by the run that created it and failed
            continue
        if fd is None or _same_folder(fd, folder):
            break
        os.close(fd)  # the folder locked was removed (and perhaps made again) meanwhile: lock the one there now
    try:
        yield folder
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _same_folder(fd: int, folder: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(folder)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


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
