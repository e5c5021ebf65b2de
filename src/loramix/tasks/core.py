"""The suite's building blocks: what a task is (`TaskSpec`, `Task`), what its builder needs (`Need`), the registry
of builders (`TASKS`), and the rules every task's instances go through (cleaning, reserved-data filter,
deduplication, cap, 80/10/10 split)."""

from __future__ import annotations

import importlib.util
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..data import Sample
from ..errors import LoramixError
from ..registry import Registry

CAP = 600  # at most this many instances per task (a seeded sample)
MIN_INSTANCES = 100  # fewer than this means the source is broken, not small
MAX_INPUT_WORDS = 80
MAX_OUTPUT_WORDS = 20
SPLITS = ("train", "valid", "test")
NAME_RE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+")

# Kept for an external evaluation: no instance may carry currency data or name the reserved relations.
RESERVED_WORDS = re.compile(r"\bcurrenc|\bmonetary unit|\bbanknote|\bmeronym|\bholonym|\bsuperlative", re.IGNORECASE)
CURRENCY_NAMES = re.compile(r"\b(dollars?|dólar(es)?|euros?|yen|pesos?|rupees?|ro?ubles?|dinars?|lira|lire)\b", re.IGNORECASE)

Pair = tuple[str, "str | Sequence[str]"]  # (input, output or [target, alternatives...])
Builder = Callable[[random.Random], Iterable[Pair]]


@dataclass(frozen=True)
class Need:
    """Something a builder reads: a Python package from PyPI or a file from a Debian package."""

    what: str
    install: str
    present: Callable[[], bool]

    def missing(self) -> str | None:
        """None when present, else a one-line message naming what to install."""
        return None if self.present() else f"needs {self.what}: {self.install}"


def pypi(module: str, package: str | None = None) -> Need:
    """A Need for the importable `module`, installed from PyPI as `package` (default: the module's name)."""
    package = package or module
    return Need(f"the Python package {package}", f"pip install {package}", lambda: importlib.util.find_spec(module) is not None)


def debian(path: Callable[[], Path | None], package: str) -> Need:
    """A Need for the file `path()` returns (None: not found), shipped by the Debian package `package`."""

    def present() -> bool:
        p = path()
        return p is not None and p.exists()

    return Need(f"the Debian package {package}", f"apt-get install {package}", present)


@dataclass(frozen=True)
class TaskSpec:
    """A registered task: its metadata and the builder yielding its (input, outputs) pairs from the source."""

    name: str
    family: str
    definition: str
    source: str
    license: str
    needs: tuple[Need, ...]
    make: Builder
    prose: bool = False  # inputs are natural prose (news), where a currency sign may occur in passing

    def missing(self) -> list[str]:
        """One message per absent source (empty when the task can be built)."""
        return [m for m in (n.missing() for n in self.needs) if m]


@dataclass
class Task:
    """A built task: metadata, instances (each an input and [target, alternatives...]) and the split of their indices."""

    name: str
    family: str
    definition: str
    source: str
    license: str
    instances: list[Sample]
    splits: dict[str, list[int]] = field(default_factory=dict)

    def id(self, i: int) -> str:
        return f"{self.name}-{i}"

    def counts(self) -> dict[str, int]:
        """Instances per split."""
        return {s: len(self.splits[s]) for s in SPLITS}

    def split(self, name: str) -> list[Sample]:
        """The instances of split `name`, each with the definition, a blank line and the instance input as input."""
        return [Sample(f"{self.definition}\n\n{self.instances[i].input}", self.instances[i].outputs) for i in self.splits[name]]

    def to_ni(self) -> dict:
        """The task as a Natural-Instructions task document, with the split as an extra `Splits` field."""
        return {
            "Definition": [self.definition],
            "Source": [self.source],
            "Categories": [self.family],
            "License": self.license,
            "Instances": [{"id": self.id(i), "input": s.input, "output": list(s.outputs)} for i, s in enumerate(self.instances)],
            "Splits": {s: [self.id(i) for i in self.splits[s]] for s in SPLITS},
        }


TASKS: Registry[TaskSpec] = Registry("task")


class Family:
    """Registers a family's tasks as `<family>_<what>`, with the family's source, licence and needs as defaults."""

    def __init__(self, name: str, source: str, license: str, needs: Sequence[Need] = (), prose: bool = False):
        self.name, self.source, self.license, self.needs, self.prose = name, source, license, tuple(needs), prose

    def task(self, what: str, definition: str, *, source: str | None = None, license: str | None = None,
             needs: Sequence[Need] | None = None) -> Callable[[Builder], Builder]:
        """Decorator registering `builder(rng) -> pairs` as the task `<family>_<what>`; returns the builder."""
        name = f"{self.name}_{what}"
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"bad task name {name!r}")

        def register(builder: Builder) -> Builder:
            spec = TaskSpec(name, self.name, definition, source or self.source, license or self.license,
                            self.needs if needs is None else tuple(needs), builder, self.prose)
            TASKS.register(name)(spec)
            return builder

        return register


def words(text: str) -> int:
    return len(text.split())


def has_reserved(text: str, prose: bool = False) -> bool:
    """True when `text` carries reserved data: a reserved word, or (except in prose, where prices occur in passing)
    a currency sign (Unicode category Sc) or a currency's name."""
    if RESERVED_WORDS.search(text):
        return True
    return not prose and (CURRENCY_NAMES.search(text) is not None or any(unicodedata.category(c) == "Sc" for c in text))


def unique(items: Iterable[str]) -> list[str]:
    """`items` without repeats, in first-seen order."""
    return list(dict.fromkeys(items))


def sample(items: Iterable, rng: random.Random, k: int = 2 * CAP) -> list:
    """A seeded sample of k of `items` (all of them, shuffled, when fewer): for builders whose inputs are unique,
    so that they only compute the instances that may be kept."""
    items = list(items)
    return rng.sample(items, min(k, len(items)))


def clean(pairs: Iterable[Pair], prose: bool = False) -> list[Sample]:
    """The pairs as samples, sorted by input: whitespace collapsed; a pair dropped when its input or target is empty,
    too long or reserved; alternatives kept when valid; pairs with the same input merged (the first target wins,
    later targets become alternatives)."""
    merged: dict[str, list[str]] = {}
    for inp, outs in pairs:
        inp = " ".join(inp.split())
        outs = [" ".join(o.split()) for o in ([outs] if isinstance(outs, str) else outs)]
        if not inp or words(inp) > MAX_INPUT_WORDS or has_reserved(inp, prose) or not outs:
            continue
        valid = [o for o in outs if o and words(o) <= MAX_OUTPUT_WORDS and not has_reserved(o)]
        if not valid or valid[0] != outs[0]:
            continue
        acc = merged.setdefault(inp, [])
        for o in valid:
            if o not in acc:
                acc.append(o)
    return [Sample(i, tuple(o)) for i, o in sorted(merged.items())]


def split_counts(n: int) -> dict[str, int]:
    """Sizes of train/valid/test for n instances: 10% (rounded) each for valid and test, the rest for train."""
    held = round(n * 0.1)
    return {"train": n - 2 * held, "valid": held, "test": held}


def build_task(name: str, seed: int = 0) -> Task:
    """Build the registered task `name`: its cleaned instances, a seeded sample of at most CAP in seeded random
    order, split 80/10/10. Raises LoramixError when a source is absent or yields too few instances."""
    spec = TASKS.get(name)
    missing = spec.missing()
    if missing:
        raise LoramixError(f"{name}: {'; '.join(missing)}")
    samples = clean(spec.make(random.Random(f"{seed}-{name}-source")), spec.prose)
    if len(samples) < MIN_INSTANCES:
        raise LoramixError(f"{name}: its source gave only {len(samples)} instances (at least {MIN_INSTANCES} expected)")
    rng = random.Random(f"{seed}-{name}")
    rng.shuffle(samples)
    samples = samples[:CAP]
    counts = split_counts(len(samples))
    bounds = [0, counts["train"], counts["train"] + counts["valid"], len(samples)]
    splits = {s: list(range(bounds[k], bounds[k + 1])) for k, s in enumerate(SPLITS)}
    return Task(spec.name, spec.family, spec.definition, spec.source, spec.license, samples, splits)
