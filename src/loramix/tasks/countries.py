"""Country and language facts: ISO 3166 and ISO 639 from pycountry, capitals, regions, languages, demonyms and
calling codes from countryinfo (joined on the ISO alpha-2 code). Currency data is reserved: never read."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterator

from .core import Family, Pair, pypi


@dataclass(frozen=True)
class Country:
    """A country: its common English name, ISO codes, and countryinfo's record (empty when it has none)."""

    name: str
    alpha2: str
    alpha3: str
    info: dict[str, Any]


@functools.lru_cache(maxsize=1)
def countries() -> list[Country]:
    """Every ISO 3166 country, sorted by alpha-2 code, with countryinfo's record where it has one (and where
    countryinfo is installed: the ISO code tasks need only pycountry)."""
    import pycountry

    try:
        import countryinfo
    except ImportError:
        countryinfo = None
    infos: dict[str, dict[str, Any]] = {}
    records = [c.info() for c in (countryinfo.all_countries() if countryinfo else [])]
    for info in sorted(records, key=lambda r: str(r.get("name"))):
        info = {k: v for k, v in info.items() if k != "currencies"}  # reserved
        iso = info.get("ISO") or {}
        if iso.get("alpha2") and iso.get("numeric"):  # skips constituent countries such as Wales
            infos.setdefault(iso["alpha2"], info)
    return [Country(getattr(c, "common_name", c.name), c.alpha_2, c.alpha_3, infos.get(c.alpha_2, {}))
            for c in sorted(pycountry.countries, key=lambda c: c.alpha_2)]


def _language_name(code: str) -> str | None:
    import pycountry

    lang = pycountry.languages.get(alpha_2=code) if len(code) == 2 else pycountry.languages.get(alpha_3=code)
    return lang.name if lang else None


CI = [pypi("pycountry"), pypi("countryinfo")]
C = Family("countries", "pycountry (ISO 3166, ISO 639 data from Debian iso-codes) and countryinfo",
           "LGPL-2.1 (pycountry), MIT (countryinfo)", needs=CI)
PYCOUNTRY = dict(source="pycountry (ISO 3166-1 and ISO 639-3 data from Debian iso-codes)", license="LGPL-2.1",
                 needs=[pypi("pycountry")])


def values(c: Country, key: str) -> list[str]:
    """countryinfo's `key` of country `c` as a list of strings (empty when absent)."""
    value = c.info.get(key)
    return [str(v) for v in value if v] if isinstance(value, list) else [str(value)] if value else []


def _field(key: str):
    """A builder of (country name, countryinfo's `key`) pairs; list values give [first, alternatives...]."""

    def build(rng) -> Iterator[Pair]:
        for c in countries():
            if values(c, key):
                yield c.name, values(c, key)

    return build


C.task("capital", "Give the capital city of the country.")(_field("capital"))
C.task("region", "Give the world region (continent) the country is in.")(_field("region"))
C.task("subregion", "Give the subregion of the world the country is in (for example Western Europe).")(_field("subregion"))
C.task("demonym", "Give the demonym of the country: the word for its people (for example France: French).")(_field("demonym"))
C.task("calling_code", "Give the international telephone calling code of the country, digits only.")(_field("callingCodes"))


@C.task("capital_to_country", "Give the country whose capital city this is.")
def _capital_to_country(rng) -> Iterator[Pair]:
    for c in countries():
        for capital in values(c, "capital"):
            yield capital, c.name


@C.task("alpha2", "Give the two-letter ISO 3166-1 code of the country.", **PYCOUNTRY)
def _alpha2(rng) -> Iterator[Pair]:
    return ((c.name, c.alpha2) for c in countries())


@C.task("alpha3", "Give the three-letter ISO 3166-1 code of the country.", **PYCOUNTRY)
def _alpha3(rng) -> Iterator[Pair]:
    return ((c.name, c.alpha3) for c in countries())


@C.task("language", "Give the main language spoken in the country.")
def _language(rng) -> Iterator[Pair]:
    for c in countries():
        names = [n for n in map(_language_name, c.info.get("languages") or []) if n]
        if names:
            yield c.name, names


@C.task("language_code", "Give the three-letter ISO 639-3 code of the language.", **PYCOUNTRY)
def _language_code(rng) -> Iterator[Pair]:
    import pycountry

    for lang in sorted(pycountry.languages, key=lambda x: x.alpha_3):
        if getattr(lang, "type", "") == "L" and getattr(lang, "scope", "") == "I":  # living individual languages
            yield lang.name, lang.alpha_3
