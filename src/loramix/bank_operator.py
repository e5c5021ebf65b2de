"""The coefficients stage on a bank (the operators themselves: `operators`): the meta-operator a configuration names,
fitted on the bank when it is trainable, and the bank's leave-one-out coefficients (each entry predicted from the
others)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .config import GenerateConfig
from .index import BankIndex
from .operators import OPERATORS, BankFit, Operator


def operator_for(index: BankIndex, config: GenerateConfig) -> Operator:
    """`config`'s operator: fitted on the bank (cached in its index) for `config`'s composition when it is trainable."""
    cls = OPERATORS.get(config.operator)
    if not cls.trainable:
        return cls()
    return index.fitted_operator(config.operator, config.signature_spec(), config.distance, config.compose, config.seed,
                                 config.operator_options)


def loo_coefficients(index: BankIndex, config: GenerateConfig, folds: int = 5,
                     groups: Mapping[str, str] | None = None) -> np.ndarray:
    """C[t] = the coefficients predicting usable entry t from the other entries that `config.entry_signatures` weights
    (`index.weighted`), [usable, weighted] with t's own entry 0: the operator on row t of `index.distance_matrix`, t's
    own entry excluded. With `groups` (entry name -> group, e.g. the suite's task families: leave-one-family-out), every
    entry of t's group is excluded too. A trainable operator is cross-fitted on the usable entries' data distances:
    fitted on `folds` - 1 folds of them (entry t at position t falls in fold t % folds) for each fold; with `groups`,
    once per group, on the other groups' entries."""
    spec = index.resolve(config.signature_spec())
    mode = config.entry_signatures
    d = index.distance_matrix(spec, config.distance, config.seed, mode, config.probe_set()).copy()
    weighted = index.weighted(mode)
    usable = index.bank.usable
    n = len(d)
    d[np.arange(n), [weighted.index(e) for e in usable]] = np.inf
    group = [None if groups is None else groups.get(e.name, e.name) for e in usable]
    if groups is not None:
        d[np.array([[g == groups.get(w.name, w.name) for w in weighted] for g in group])] = np.inf
    c = np.zeros_like(d)
    cls = OPERATORS.get(config.operator)
    if not cls.trainable:
        op = cls()
        for t in range(n):
            c[t] = op.coefficients(d[t], config.temperature, config.top_k)
        return c
    fit = index.distance_matrix(spec, config.distance, config.seed).copy()
    np.fill_diagonal(fit, np.inf)
    data = BankFit(index.bank, usable, fit, config.compose)
    fold = np.array(group if groups is not None else np.arange(n) % folds, dtype=object)
    for f in dict.fromkeys(fold):
        train = np.flatnonzero(fold != f)
        op = cls().configured(config.operator_options).fit_bank(data.subset(train), seed=config.seed)
        for t in np.flatnonzero(fold == f):
            c[t] = op.coefficients(d[t], config.temperature, config.top_k)
    return c
