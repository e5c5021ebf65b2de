"""Word translation tasks from FreeDict dictionaries in dictd format (Debian packages dict-freedict-*).

A dictd dictionary is an `.index` file, one `headword TAB offset TAB length` line per entry (offset and length in
dictd's base64 digits), and a `.dict.dz` file: the entries' text, dictzip-compressed (gzip-compatible). Only the
six directions in DIRECTIONS are read: every other FreeDict dictionary is reserved."""

from __future__ import annotations

import functools
import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .core import CAP, Family, Pair, debian, sample, unique

DICTD_DIR = Path("/usr/share/dictd")
DIRECTIONS = ("eng-fra", "fra-eng", "eng-deu", "deu-eng", "eng-spa", "spa-eng")
LANGUAGES = {"eng": "English", "fra": "French", "deu": "German", "spa": "Spanish"}
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
MAX_ALTERNATIVES = 3
HEADWORD_RE = re.compile(r"[^\W\d_]{2,}(?:-[^\W\d_]+)?")  # one word, letters only (a hyphen allowed)
NOISE_RE = re.compile(r"\[[^\]]*\]|<[^>]*>|/[^/]*/|\([^)]*\)|\{[^}]*\}")  # domains, grammar, IPA, remarks, links
LABEL_RE = re.compile(r"^[A-Za-z ]+:")  # "see:", "Synonym:", "Note:" lines
SUPERLATIVE_RE = re.compile(r"^(am|most|least|le plus|la plus|les plus|el más|la más|los más|las más|lo más)\b", re.IGNORECASE)


def b64_number(digits: str) -> int:
    """The number written in dictd's base64 digits (A=0 ... /=63, most significant first)."""
    n = 0
    for c in digits:
        n = n * 64 + B64.index(c)
    return n


def read_dict(path: Path) -> bytes:
    """The whole text of a `.dict.dz` (or plain `.dict`) file, decompressed."""
    return gzip.decompress(path.read_bytes()) if path.suffix == ".dz" else path.read_bytes()


def parse_entry(text: str) -> tuple[str, list[str]]:
    """An entry's headword (without pronunciation and grammar) and its translations, in order, cleaned of numbering,
    domain labels, grammatical annotations and remarks; example, note and cross-reference lines skipped."""
    lines = text.strip("\n").split("\n")
    head = re.split(r"\s+/|\s+<", lines[0], maxsplit=1)[0].strip()
    out = []
    for line in lines[1:]:
        s = line.strip()
        if not s or line.startswith("  ") or s.startswith('"') or LABEL_RE.match(s):
            continue
        s = NOISE_RE.sub(" ", re.sub(r"^\d+\.\s*", "", s))
        out.extend(" ".join(p.split()) for p in re.split(r"[,;]", s))
    return head, unique(p for p in out if p)


def _superlative(head: str, translations: list[str]) -> bool:
    """True when the pair looks like an adjective superlative (reserved): 'most ...', 'am ...sten', '-est' = '-ste'."""
    both = [head, *translations]
    if any(SUPERLATIVE_RE.match(w) for w in both):
        return True
    return any(w.endswith("est") for w in both) and any(re.search(r"st(e|en|er|es|em)$", w) for w in both)


@dataclass
class Dictionary:
    """A dictd dictionary: its index lines, one per entry (dictd keeps them sorted, so a headword's entries are
    adjacent), without the `00database...` metadata entries, and its decompressed text."""

    lines: list[str]
    text: bytes

    @classmethod
    def read(cls, index: Path, data: Path) -> "Dictionary":
        """The dictionary of the `.index` file `index` and the `.dict.dz` (or `.dict`) file `data`."""
        lines = index.read_text(encoding="utf-8").split("\n")
        return cls([x for x in lines if x and not x.startswith(("00database", "00-database"))], read_dict(data))

    def headword(self, i: int) -> str:
        """The headword of index line i."""
        return self.lines[i].split("\t", 1)[0]

    def entry(self, i: int) -> str:
        """The text of the entry of index line i."""
        _, off, length = self.lines[i].split("\t")[:3]
        start = b64_number(off)
        return self.text[start:start + b64_number(length)].decode("utf-8", errors="replace")

    def entries(self, i: int) -> list[str]:
        """The texts of all the entries of the headword of index line i."""
        head, lo, hi = self.headword(i), i, i
        while lo > 0 and self.headword(lo - 1) == head:
            lo -= 1
        while hi + 1 < len(self.lines) and self.headword(hi + 1) == head:
            hi += 1
        return [self.entry(j) for j in range(lo, hi + 1)]


def dictionary(name: str) -> Dictionary:
    """The FreeDict dictionary `name` (e.g. eng-fra) in DICTD_DIR, read once."""
    if name not in DIRECTIONS:
        raise ValueError(f"FreeDict {name} is not one of the directions in use")
    return _read_cached(DICTD_DIR / f"freedict-{name}.index", DICTD_DIR / f"freedict-{name}.dict.dz")


@functools.lru_cache(maxsize=1)
def _read_cached(index: Path, data: Path) -> Dictionary:
    return Dictionary.read(index, data)


def translations(name: str, rng, limit: int = 2 * CAP) -> Iterator[Pair]:
    """Up to `limit` (headword, [translation, ...]) pairs of the dictionary `name` (e.g. eng-fra), for the one-word
    headwords of a seeded sample of its index lines, with at most MAX_ALTERNATIVES translations of at most four
    words each."""
    d = dictionary(name)
    seen: set[str] = set()
    for i in sample(range(len(d.lines)), rng, 8 * limit):
        h = d.headword(i)
        if h in seen or not HEADWORD_RE.fullmatch(h):
            continue
        seen.add(h)
        parsed = [(w, t) for w, t in map(parse_entry, d.entries(i)) if w.lower() == h.lower()]
        words = unique(t for _, ts in parsed for t in ts if len(t.split()) <= 4 and not re.search(r"\d", t))
        if parsed and words and not _superlative(parsed[0][0], words):
            yield parsed[0][0], words[:MAX_ALTERNATIVES]
            limit -= 1
            if limit == 0:
                return


FD = Family("freedict", "FreeDict dictionaries (Debian packages dict-freedict-*)", "GPL-2.0-or-later")

for _name in DIRECTIONS:
    _src, _tgt = _name.split("-")
    FD.task(f"{_src}_{_tgt}", f"Translate the {LANGUAGES[_src]} word into {LANGUAGES[_tgt]}.",
            source=f"FreeDict {LANGUAGES[_src]}-{LANGUAGES[_tgt]} dictionary, Debian package dict-freedict-{_name}",
            license="GPL-3.0 and AGPL-3.0 (Ding)" if "deu" in _name else "GPL-2.0-or-later",
            needs=[debian(lambda n=_name: DICTD_DIR / f"freedict-{n}.index", f"dict-freedict-{_name}")],
            )(lambda rng, n=_name: translations(n, rng))
