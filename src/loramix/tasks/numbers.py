"""Number tasks: numbers written out in English, French, Spanish and German words and as ordinals (num2words),
and Roman numerals (roman). The numbers are a seeded sample, with as many of each digit count."""

from __future__ import annotations

from typing import Iterator

from .core import CAP, Family, Pair, pypi

MAX_DIGITS = 6


def sample_numbers(rng, n: int = 2 * CAP, digits: int = MAX_DIGITS, low: int = 0, high: int | None = None) -> list[int]:
    """`n` distinct numbers: a digit count drawn uniformly from 1..digits, then a number of that many digits,
    kept within [low, high]."""
    high = 10**digits - 1 if high is None else high
    seen: dict[int, None] = {}
    while len(seen) < min(n, high - low + 1):
        d = rng.randint(1, digits)
        v = rng.randrange(10 ** (d - 1) if d > 1 else 0, 10**d)
        if low <= v <= high:
            seen[v] = None
    return list(seen)


NUM2WORDS = [pypi("num2words")]
NU = Family("numbers", "num2words (PyPI)", "LGPL-2.1", needs=NUM2WORDS)
ROMAN = dict(source="roman (PyPI)", license="ZPL-2.1", needs=[pypi("roman")])


def _words(lang: str, to: str = "cardinal", reverse: bool = False):
    """A builder of (number, its words in `lang`) pairs, or the reverse."""

    def build(rng) -> Iterator[Pair]:
        from num2words import num2words

        for v in sample_numbers(rng):
            w = num2words(v, lang=lang, to=to)
            yield (w, str(v)) if reverse else (str(v), w)

    return build


NU.task("english", "Write the number in English words.")(_words("en"))
NU.task("from_english", "Write the number given in English words as digits.")(_words("en", reverse=True))
NU.task("ordinal", "Write the ordinal of the number in English words (for example 21: twenty-first).")(_words("en", "ordinal"))
NU.task("french", "Write the number in French words.")(_words("fr"))
NU.task("spanish", "Write the number in Spanish words.")(_words("es"))
NU.task("german", "Write the number in German words.")(_words("de"))


@NU.task("roman", "Write the number as a Roman numeral.", **ROMAN)
def _roman(rng) -> Iterator[Pair]:
    import roman

    return ((str(v), roman.toRoman(v)) for v in sample_numbers(rng, digits=4, low=1, high=3999))


@NU.task("from_roman", "Write the Roman numeral as a number in digits.", **ROMAN)
def _from_roman(rng) -> Iterator[Pair]:
    import roman

    return ((roman.toRoman(v), str(v)) for v in sample_numbers(rng, digits=4, low=1, high=3999))
