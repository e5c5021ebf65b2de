"""WordNet 3.0 tasks, read from the database files of the Debian package wordnet-base (/usr/share/wordnet).

The files are parsed here: nltk's reader also wants a `lexnames` file, which Debian ships only as the
lexnames(5WN) man page. `data.*` give the synsets, `index.*` each lemma's senses in frequency order (and how
many of them occur in the tagged corpus, used to keep common words). Only hypernym, antonym and pertainym
pointers are kept: meronym and holonym relations are reserved and never read."""

from __future__ import annotations

import functools
import gzip
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import LoramixError
from .core import CAP, Family, Need, Pair, debian, sample

WORDNET_DIR = Path("/usr/share/wordnet")
LEXNAMES_MAN = Path("/usr/share/man/man5/lexnames.5WN.gz")
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}
KEPT_POINTERS = ("@", "!", "\\")  # hypernym, antonym, pertainym
LEXNAME_RE = re.compile(r"^(\d\d)\s+([a-z]+\.[A-Za-z]+)")
WORD_RE = re.compile(r"[a-z][a-z'-]*(?: [a-z][a-z'-]*){0,2}")  # lowercase words, at most three


@dataclass(frozen=True)
class Synset:
    """A synset: part of speech (n, v, a, r; satellites are a), offset, lexicographer file number, its words
    (underscores as spaces, adjective markers removed), kept pointers (symbol, pos, offset, source word,
    target word; word numbers from 1, 0 for the whole synset) and gloss."""

    pos: str
    offset: int
    lexname: int
    words: tuple[str, ...]
    pointers: tuple[tuple[str, str, int, int, int], ...]
    gloss: str

    def related(self, symbol: str) -> list[tuple[str, int, int, int]]:
        """(pos, offset, source, target) of the pointers with `symbol`."""
        return [p[1:] for p in self.pointers if p[0] == symbol]


@dataclass(frozen=True)
class Lemma:
    """An index entry: the lemma, its part of speech, its synset offsets in sense order, and its tagged sense count."""

    lemma: str
    pos: str
    offsets: tuple[int, ...]
    tagged: int


def _pos(p: str) -> str:
    return "a" if p == "s" else p


def parse_data_line(line: str) -> Synset | None:
    """The synset on one `data.*` line, or None for the licence header's lines."""
    if line.startswith(" ") or "|" not in line:
        return None
    head, _, gloss = line.partition(" | ")
    f = head.split()
    n_words = int(f[3], 16)
    words = tuple((w[:w.index("(")] if w.endswith(")") else w).replace("_", " ") for w in f[4:4 + 2 * n_words:2])
    k = 4 + 2 * n_words
    n_ptrs = int(f[k])
    ptrs = [f[k + 1 + 4 * i:k + 5 + 4 * i] for i in range(n_ptrs)]
    kept = tuple((s, _pos(p), int(o), int(st[:2], 16), int(st[2:], 16)) for s, o, p, st in ptrs if s in KEPT_POINTERS)
    return Synset(_pos(f[2]), int(f[0]), int(f[1]), words, kept, gloss.strip())


def parse_index_line(line: str) -> Lemma | None:
    """The entry on one `index.*` line, or None for the licence header's lines."""
    if line.startswith(" ") or not line.strip():
        return None
    f = line.split()
    n_senses, n_ptrs = int(f[2]), int(f[3])
    tagged = int(f[5 + n_ptrs])
    return Lemma(f[0].replace("_", " "), _pos(f[1]), tuple(int(o) for o in f[6 + n_ptrs:6 + n_ptrs + n_senses]), tagged)


def read_lexnames(path: Path) -> dict[int, str]:
    """Lexicographer file numbers -> names (e.g. 5 -> noun.animal), from a `lexnames` file or the lexnames(5WN) man page."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return {int(m[1]): m[2] for m in map(LEXNAME_RE.match, f) if m}


@dataclass
class WordNet:
    """The parsed database: synsets by (pos, offset), index entries by pos and lemma, lexnames by number."""

    synsets: dict[tuple[str, int], Synset]
    index: dict[str, dict[str, Lemma]]
    lexnames: dict[int, str]

    def senses(self, lemma: Lemma) -> list[Synset]:
        """The lemma's synsets, most frequent sense first."""
        return [self.synsets[lemma.pos, o] for o in lemma.offsets]

    def word(self, lemma: Lemma) -> str:
        """The lemma as its first synset writes it (keeps capitals and hyphens)."""
        return next((w for w in self.senses(lemma)[0].words if w.lower() == lemma.lemma), lemma.lemma)

    def common(self, pos: str) -> Iterator[Lemma]:
        """Lemmas of `pos` with a sense in the tagged corpus and a plain lowercase spelling, in alphabetical order."""
        return (e for k, e in sorted(self.index[pos].items()) if e.tagged > 0 and WORD_RE.fullmatch(k))


def lexnames_path(folder: Path | None = None) -> Path | None:
    """Where the lexnames table is: the folder's `lexnames` file, else the man page; None when neither exists."""
    return next((p for p in ((folder or WORDNET_DIR) / "lexnames", LEXNAMES_MAN) if p.exists()), None)


def read_wordnet(folder: Path) -> WordNet:
    """The WordNet database in `folder` (data.noun, index.noun, ... as Debian's wordnet-base installs them)."""
    if not (folder / "data.noun").exists():
        raise LoramixError(f"WordNet not found in {folder}: apt-get install wordnet-base")
    synsets, index = {}, {}
    for pos, name in POS_FILES.items():
        with open(folder / f"data.{name}", encoding="utf-8", errors="replace") as f:
            synsets.update(((s.pos, s.offset), s) for s in map(parse_data_line, f) if s)
        with open(folder / f"index.{name}", encoding="utf-8", errors="replace") as f:
            index[pos] = {e.lemma: e for e in map(parse_index_line, f) if e}
    lex = lexnames_path(folder)
    return WordNet(synsets, index, read_lexnames(lex) if lex else {})


def wordnet() -> WordNet:
    """The WordNet in WORDNET_DIR, parsed once."""
    return _read_cached(WORDNET_DIR)


@functools.lru_cache(maxsize=2)
def _read_cached(folder: Path) -> WordNet:
    return read_wordnet(folder)


def short_gloss(gloss: str) -> str:
    """A gloss's definition without its examples: the text before the first semicolon or quote."""
    return re.split(r'[;"]', gloss, maxsplit=1)[0].strip()


def _all_common(wn: WordNet) -> list[Lemma]:
    """The common lemmas of every part of speech."""
    return [e for pos in POS_FILES for e in wn.common(pos)]


WN = Family("wordnet", "WordNet 3.0 (Princeton University), Debian package wordnet-base",
            "WordNet 3.0 license (BSD-style)", needs=[debian(lambda: WORDNET_DIR / "data.noun", "wordnet-base")])


def _definitions(pos: str):
    def build(rng) -> Iterator[Pair]:
        wn = wordnet()
        for lem in sample((e for e in wn.common(pos) if len(e.offsets) <= 3), rng):  # few senses: better determined
            yield wn.word(lem), [short_gloss(s.gloss) for s in wn.senses(lem)]

    return build


for _pos_code, _what in (("n", "noun"), ("v", "verb"), ("a", "adjective")):
    WN.task(f"{_what}_definition", f"Give a short definition of the {_what}, as a dictionary would.")(_definitions(_pos_code))


@WN.task("definition_to_word", "Give the word that the definition defines.")
def _definition_to_word(rng) -> Iterator[Pair]:
    wn = wordnet()
    for lem in sample(_all_common(wn), rng):
        first = wn.senses(lem)[0]
        yield short_gloss(first.gloss), [wn.word(lem), *first.words]


@WN.task("synonym", "Give a synonym of the word: another word with the same meaning.")
def _synonym(rng) -> Iterator[Pair]:
    wn = wordnet()
    for lem in sample(_all_common(wn), rng, 4 * CAP):
        syns = [w for s in wn.senses(lem) for w in s.words if w.lower() != lem.lemma]
        if syns and any(w.lower() != lem.lemma for w in wn.senses(lem)[0].words):
            yield wn.word(lem), syns


@WN.task("antonym", "Give an antonym of the word: a word with the opposite meaning.")
def _antonym(rng) -> Iterator[Pair]:
    wn = wordnet()
    for s in wn.synsets.values():
        for pos, offset, src, tgt in s.related("!"):
            if src and tgt and WORD_RE.fullmatch(s.words[src - 1]):
                yield s.words[src - 1], [wn.synsets[pos, offset].words[tgt - 1]]


@WN.task("hypernym", "Give a more general term (a hypernym) for the noun.")
def _hypernym(rng) -> Iterator[Pair]:
    wn = wordnet()
    for lem in sample(wn.common("n"), rng):
        hyper = [w for pos, o, _, _ in wn.senses(lem)[0].related("@") for w in wn.synsets[pos, o].words]
        if hyper:
            yield wn.word(lem), hyper


@WN.task("part_of_speech", "Give the part of speech of the word: noun, verb, adjective or adverb.")
def _part_of_speech(rng) -> Iterator[Pair]:
    wn = wordnet()
    per_pos = 150  # balanced classes
    for pos in POS_FILES:
        only = [w for w in (e.lemma for e in wn.common(pos)) if sum(w in wn.index[p] for p in POS_FILES) == 1]
        for w in rng.sample(only, min(per_pos, len(only))):
            yield w, POS_NAMES[pos]


@WN.task("lexical_category", "Give the semantic category of the noun (for example animal, artifact, food or person).",
         needs=[*WN.needs, Need("the lexnames(5WN) man page of wordnet-base", "apt-get install --reinstall wordnet-base "
                                "(with man pages not excluded by dpkg)", lambda: lexnames_path() is not None)])
def _lexical_category(rng) -> Iterator[Pair]:
    wn = wordnet()
    for lem in sample(wn.common("n"), rng, 4 * CAP):
        name = wn.lexnames.get(wn.senses(lem)[0].lexname, "")
        if len(lem.offsets) == 1 and name.startswith("noun.") and name != "noun.Tops":
            yield wn.word(lem), name.split(".", 1)[1]


@WN.task("pertainym", "Give the noun that the adjective relates to (for example atomic: atom).")
def _pertainym(rng) -> Iterator[Pair]:
    wn = wordnet()
    for s in wn.synsets.values():
        for pos, offset, src, tgt in s.related("\\"):
            if s.pos == "a" and pos == "n" and src and tgt and WORD_RE.fullmatch(s.words[src - 1]):
                yield s.words[src - 1], [wn.synsets[pos, offset].words[tgt - 1]]
