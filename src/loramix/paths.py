"""Where loramix keeps things: its cache home, the bank and task suite it ships, and bank index folders.

Imports nothing of loramix but its errors, so that any module may ask for a path."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import LoramixError

DEFAULT_DIR = Path(__file__).parent / "default"
DEFAULT_BANK = DEFAULT_DIR / "bank"
DEFAULT_SUITE = DEFAULT_DIR / "suite"
INDEX_DIR = ".loramix"  # a bank's index (cached signatures, distances, operators), inside the bank folder


def loramix_home() -> Path:
    """Cache folder: $LORAMIX_HOME, else the platform's user cache dir for loramix. One that exists as something
    other than a folder (a file, a FIFO), or lies under a file, is refused in one line naming it."""
    if env := os.environ.get("LORAMIX_HOME"):
        return _folder(Path(env), "LORAMIX_HOME")
    import platformdirs

    return _folder(Path(platformdirs.user_cache_dir("loramix")), "loramix's cache folder")


def _folder(path: Path, what: str) -> Path:
    if path.is_symlink() and not path.exists():
        raise LoramixError(f"{what} {path} is a link to {os.readlink(path)}, which does not exist: set LORAMIX_HOME to a "
                           "folder (or create the link's target)")
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            where = "is a file" if p == path else f"lies under {p}, which is a file"
            raise LoramixError(f"{what} {path} {where}, not a folder: set LORAMIX_HOME to a folder (or remove the file)")
    return path


def resolve_bank(bank: str | Path) -> Path:
    """'default' -> the bank shipped with loramix; anything else is a bank folder."""
    return DEFAULT_BANK if str(bank) == "default" else Path(bank)


def resolve_suite(suite: str | Path) -> Path:
    """'default' -> the suite shipped with loramix; anything else is a folder built by `loramix tasks build`."""
    path = DEFAULT_SUITE if str(suite) == "default" else Path(suite)
    if not path.is_dir():
        raise LoramixError(f"{path}: suite folder not found (build one with `loramix tasks build --out DIR`)")
    return path


def index_dir(bank: Path) -> Path:
    """BANK/.loramix, or a folder in loramix's cache (one per resolved path) when the bank folder is read-only
    (an installed package). A BANK/.loramix that is a link, or not a folder, is refused: the index is written only
    inside the bank."""
    local = bank / INDEX_DIR
    if local.is_symlink() or (local.exists() and not local.is_dir()):
        raise LoramixError(f"{local}: is a link or not a folder; loramix writes a bank's index only inside the bank "
                           "(remove it, and it is rebuilt)")
    if os.access(bank, os.W_OK):
        return local
    return loramix_home() / "index" / hashlib.sha256(str(bank.resolve()).encode()).hexdigest()[:16]
