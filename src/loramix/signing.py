"""How bank entries are signed (`entry_signatures`): each mode one registered class that says which entries get
coefficients and how a distance row (the user's dataset to every weighted entry) and the bank's leave-one-out matrix
are made from the index's cached signatures. 'auto' is no mode but a rule choosing one (`signing_mode`)."""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import numpy as np

from .distances import aligned, distance_row
from .errors import LoramixError
from .registry import Registry

AUTO = "auto"  # the rule: 'data' when every entry has data, 'probes' when fewer than MIN_ALIGNED do, else 'mixed'
MIN_ALIGNED = 3  # entries with data a mixed bank needs to align its probe distances onto its data distances

# Lazy probe signatures: called only by a mode that uses probe answers, so the base model runs only then.
ProbeSignatures = Callable[[], list]  # every entry's signature of its probe answers, in bank.entries order
ProbeMatrix = Callable[[], np.ndarray]  # [usable, entries]: usable entry i's data to entry j's probe answers


class SigningMode:
    """One way to sign bank entries. `probes`: whether some entry is signed by its greedy answers to probe prompts (so
    the base model runs, once per bank: the answers are cached). Distances are float64; +inf means 'no weight'."""

    name: ClassVar[str]
    probes: ClassVar[bool] = True

    def weighted(self, bank: Any) -> list:
        """The entries that get coefficients: every entry unless a mode says otherwise."""
        return list(bank.entries)

    def probed(self, bank: Any) -> list:
        """The weighted entries signed by their probe answers."""
        return [e for e in self.weighted(bank) if not e.has_data] if self.probes else []

    def row(self, index: Any, spec: Any, distance: str, user: np.ndarray, seed: int, probe_sigs: ProbeSignatures) -> np.ndarray:
        """d(user signature, entry) over `weighted`, [n]."""
        raise NotImplementedError

    def matrix(self, index: Any, spec: Any, distance: str, seed: int, data: np.ndarray, cross: ProbeMatrix) -> np.ndarray:
        """D[i, j] = d(usable entry i's data, weighted entry j), [usable, n]; `data` is the usable entries' own
        [usable, usable] matrix."""
        raise NotImplementedError


SIGNING_MODES: Registry[type[SigningMode]] = Registry("entry-signing mode")


@SIGNING_MODES.register("data")
class DataSigning(SigningMode):
    """Every entry by its training data (train.jsonl); entries without any get no weight."""

    name = "data"
    probes = False

    def weighted(self, bank: Any) -> list:
        return list(bank.usable)

    def row(self, index, spec, distance, user, seed, probe_sigs):
        return distance_row(distance, user, index.signatures(spec), seed)

    def matrix(self, index, spec, distance, seed, data, cross):
        return data


@SIGNING_MODES.register("probes")
class ProbeSigning(SigningMode):
    """Every entry by its answers to the probe prompts: no bank data is used."""

    name = "probes"

    def probed(self, bank: Any) -> list:
        return list(bank.entries)

    def row(self, index, spec, distance, user, seed, probe_sigs):
        return distance_row(distance, user, probe_sigs(), seed)

    def matrix(self, index, spec, distance, seed, data, cross):
        return cross()


@SIGNING_MODES.register("mixed")
class MixedSigning(SigningMode):
    """Training data where an entry has it, probe answers elsewhere, mapped onto the data distances' scale
    (`distances.aligned`, fitted on the entries that have both)."""

    name = "mixed"

    def row(self, index, spec, distance, user, seed, probe_sigs):
        d_data = distance_row(distance, user, index.signatures(spec), seed)
        return aligned(distance_row(distance, user, probe_sigs(), seed), _spread(index.bank, d_data))

    def matrix(self, index, spec, distance, seed, data, cross):
        own = np.eye(len(data), dtype=bool)  # a row's own entry: left out of its alignment
        return np.stack([aligned(p, _spread(index.bank, np.where(o, np.inf, d))) for p, d, o in zip(cross(), data, own)])


def _spread(bank: Any, d_usable: np.ndarray) -> np.ndarray:
    """A row over the usable entries laid out over every entry, NaN for those without data."""
    row = np.full(len(bank.entries), np.nan)
    row[[bank.entries.index(e) for e in bank.usable]] = d_usable
    return row


def signing_names() -> list[str]:
    """What `entry_signatures` accepts: 'auto' and every registered mode."""
    return [AUTO, *SIGNING_MODES.names()]


def signing_mode(bank: Any, name: str) -> SigningMode:
    """The mode `name` names for `bank`; 'auto' (AUTO) is 'data' when every entry has data, 'probes' when fewer than
    MIN_ALIGNED do, else 'mixed'."""
    if not isinstance(name, str) or name not in signing_names():
        raise LoramixError(f"entry signatures must be one of {', '.join(signing_names())}, got {name!r}")
    if name == AUTO:
        usable = len(bank.usable)
        name = "data" if usable == len(bank.entries) else "probes" if usable < MIN_ALIGNED else "mixed"
    return SIGNING_MODES.get(name)()
