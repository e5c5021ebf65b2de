"""Symbol tasks: emoji names (PyPI emoji), Unicode character names (stdlib unicodedata) and kaomoji emotions
(PyPI kaomoji-dataset). Currency data is reserved: currency signs (category Sc) and symbols named after money or
a currency are left out."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Iterator

from .core import Family, Pair, pypi

# Blocks of characters with short, meaningful names: Latin letters with diacritics, IPA, Greek, Cyrillic,
# punctuation, letterlike symbols, number forms, arrows, mathematical operators, technical, box drawing,
# geometric shapes, miscellaneous symbols, dingbats.
BLOCKS = ((0x00C0, 0x024F), (0x0250, 0x02AF), (0x0370, 0x03FF), (0x0400, 0x04FF), (0x2010, 0x205E),
          (0x2100, 0x214F), (0x2150, 0x218F), (0x2190, 0x21FF), (0x2200, 0x22FF), (0x2300, 0x23FF),
          (0x2500, 0x257F), (0x25A0, 0x25FF), (0x2600, 0x26FF), (0x2700, 0x27BF))
MONEY_RE = re.compile(r"\b(currency|money|banknote|dollar|euro|yen|pound|rupee|franc|lira|peso|ruble|rouble|won|"
                      r"cent|coin|credit card|bank)s?\b", re.IGNORECASE)
KAOMOJI_SKIP = {"uncategorized", "special"}
KAOMOJI_MIN = 50  # categories with fewer core kaomoji are left out


def money_free(*texts: str) -> bool:
    """True when no text has a currency sign or names money or a currency."""
    return not any(MONEY_RE.search(t) or any(unicodedata.category(c) == "Sc" for c in t) for t in texts)


def emoji_names() -> list[tuple[str, str]]:
    """(emoji, English name) of the fully-qualified emoji without skin-tone variants, sorted by emoji."""
    import emoji

    out = []
    for e, data in sorted(emoji.EMOJI_DATA.items()):
        name = data["en"].strip(":").replace("_", " ")
        if data.get("status") == emoji.STATUS["fully_qualified"] and "skin tone" not in name and money_free(e, name):
            out.append((e, name))
    return out


def unicode_names() -> list[tuple[str, str]]:
    """(character, Unicode name) of the letters, numbers, punctuation and non-currency symbols in BLOCKS."""
    out = []
    for lo, hi in BLOCKS:
        for cp in range(lo, hi + 1):
            c = chr(cp)
            name = unicodedata.name(c, "")
            if name and unicodedata.category(c)[0] in "LNPS" and money_free(c, name):
                out.append((c, name))
    return out


S = Family("symbols", "Unicode emoji data (PyPI emoji)", "BSD-3-Clause (emoji), Unicode License v3 (data)", needs=[pypi("emoji")])
UCD = dict(source=f"Unicode Character Database {unicodedata.unidata_version} (Python unicodedata)",
           license="Unicode License v3", needs=[])


@S.task("emoji_name", "Give the name of the emoji.")
def _emoji_name(rng) -> Iterator[Pair]:
    return iter(emoji_names())


@S.task("name_to_emoji", "Give the emoji with this name.")
def _name_to_emoji(rng) -> Iterator[Pair]:
    return ((name, e) for e, name in emoji_names())


@S.task("unicode_name", "Give the official Unicode name of the character.", **UCD)
def _unicode_name(rng) -> Iterator[Pair]:
    return iter(unicode_names())


@S.task("name_to_char", "Give the character with this official Unicode name.", **UCD)
def _name_to_char(rng) -> Iterator[Pair]:
    return ((name, c) for c, name in unicode_names())


@S.task("kaomoji_category", "Give the emotion or topic the kaomoji (Japanese emoticon) expresses, in one or two words.",
        source="kaomoji-dataset (PyPI), core tier", license="CC-BY-4.0", needs=[pypi("kaomoji_dataset", "kaomoji-dataset")])
def _kaomoji_category(rng) -> Iterator[Pair]:
    path = Path(importlib.util.find_spec("kaomoji_dataset").origin).parent / "data" / "kaomoji.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        entries = (json.loads(line) for line in f if '"core"' in line)
        core = [(e["text"], e["category"]) for e in entries if e.get("tier") == "core"]
    counts = Counter(c for _, c in core)
    for text, category in sorted(core):
        if category not in KAOMOJI_SKIP and counts[category] >= KAOMOJI_MIN and money_free(text, category):
            yield text, category
