"""Stage 4: meta-operators. A row of distances (user dataset -> each bank entry) becomes mixing coefficients:
non-negative, summing to 1. An entry at +inf is excluded (weight 0), as the paper's leave-one-out does.

`attentional`: softmin(d / T). `normalized`: softmin(z / T), z the row's z-score. `neural`: softmin(f(z) / T),
f a scalar MLP fitted on the bank to reconstruct each adapter from the others (the paper's). `neural-answer`:
softmin((z + g(z)) / T), g a scalar MLP trained on the bank's leave-one-out to lower each held-out entry's answer
loss under the composition of the others (beyond the paper).

A trainable operator is fitted on a `BankFit`: the bank's distance matrix, and the adapters and data behind it (the
`neural` operator's target is their Gram matrix, `compose.gram_matrix`, in the space the composition method declares:
Composer.operator_space)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from .arguments import checked
from .arguments import check_seed
from .arguments import finite as finite_number
from .bank import Bank, BankEntry
from .errors import LoramixError
from .registry import Param, Registry, options


def softmin(scores: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """exp(-s / T) / sum exp(-s / T) over the finite entries of `scores` [n]; +inf entries get 0."""
    if not (isinstance(temperature, (int, float, np.integer, np.floating)) and not isinstance(temperature, (bool, np.bool_))
            and finite_number(temperature) and temperature > 0):
        raise LoramixError(f"temperature must be positive and finite, got {temperature!r}")
    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    if not finite.any():
        raise LoramixError("no bank entry is available to weight (every distance is excluded)")
    w = np.zeros_like(scores)
    w[finite] = np.exp(-(scores[finite] - scores[finite].min()) / temperature)
    return w / w.sum()


def keep_top_k(c: np.ndarray, k: int | None) -> np.ndarray:
    """The k largest coefficients renormalised to sum 1, the rest 0 (ties go to the lower index)."""
    if k is not None and (isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer))):
        raise LoramixError(f"top-k must be a whole number, got {type(k).__name__} {k!r}")
    if k is None or k >= np.count_nonzero(c):
        return c
    if k < 1:
        raise LoramixError(f"top-k must be at least 1, got {k}")
    keep = np.argsort(-c, kind="stable")[:k]
    out = np.zeros_like(c)
    out[keep] = c[keep]
    return out / out.sum()


def zscore(d: np.ndarray) -> np.ndarray:
    """(d - mean) / std over the finite entries; +inf stays +inf; a constant row becomes zeros."""
    d = np.asarray(d, dtype=np.float64)
    finite = np.isfinite(d)
    z = np.full_like(d, np.inf)
    std = d[finite].std()
    z[finite] = (d[finite] - d[finite].mean()) / std if std > 0 else 0.0
    return z


@dataclass
class BankFit:
    """What a trainable operator is fitted on: `distances` [n, n] between `entries` (of `bank`; diagonal ignored),
    composed by the method `compose`. `gram` [n, n] (float64) is computed from the adapters when first asked for,
    unless given."""

    bank: Bank | None
    entries: Sequence[BankEntry]
    distances: np.ndarray
    compose: str = "exact"
    _gram: np.ndarray | None = field(default=None, repr=False)

    def gram(self) -> np.ndarray:
        if self._gram is None:
            from .compose import COMPOSERS, gram_matrix

            self._gram = gram_matrix(self.bank, self.entries, COMPOSERS.get(self.compose).operator_space)
        return self._gram

    def subset(self, rows: Sequence[int]) -> "BankFit":
        """The fit restricted to the entries at `rows` (a Gram matrix already computed is sliced, not recomputed)."""
        ix = np.ix_(rows, rows)
        return BankFit(self.bank, [self.entries[i] for i in rows], self.distances[ix], self.compose,
                       None if self._gram is None else self._gram[ix])


class Operator:
    """Maps a distance row [n] (+inf = excluded) to scores; `coefficients` applies softmin and top-k.

    A trainable operator (`trainable = True`) also implements `fit_bank(BankFit, *, seed) -> self` on at least
    `min_entries` entries, `to_bytes() -> bytes` and the classmethod `from_bytes(data)`; the bank index fits and
    caches it (BankIndex.fitted_operator, the bytes under the index's HMAC). `parameters`: the knobs of its
    training it declares (GenerateConfig.operator_options sets them; each an attribute, its default on the class)."""

    trainable = False
    min_entries = 1
    parameters: ClassVar[dict[str, Param]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, param in cls.parameters.items():
            setattr(cls, name, param.default)

    def configured(self, given: dict[str, Any] | None) -> "Operator":
        """This operator with its declared parameters set from `given` (the rest at their defaults)."""
        for name, value in options("operator", type(self).__name__, self.parameters, given).items():
            setattr(self, name, value)
        return self

    def scores(self, d: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def coefficients(self, d: np.ndarray, temperature: float = 1.0, top_k: int | None = None) -> np.ndarray:
        return keep_top_k(softmin(self.scores(d), temperature), top_k)


OPERATORS: Registry[type[Operator]] = Registry("operator")


def trainable_operator(name: str) -> type[Operator]:
    """The registered operator `name`, refused in one line unless it is trainable (fitted on a bank)."""
    cls = OPERATORS.get(name)
    if not cls.trainable:
        names = ", ".join(n for n in OPERATORS.names() if OPERATORS.get(n).trainable)
        raise LoramixError(f"operator '{name}' is not trained: use it as it is (trainable: {names})")
    return cls


@OPERATORS.register("attentional")
class Attentional(Operator):
    """softmin(d / T): the paper's attentional operator (which has T = 1)."""

    def scores(self, d: np.ndarray) -> np.ndarray:
        return np.asarray(d, dtype=np.float64)


@OPERATORS.register("normalized")
class Normalized(Operator):
    """softmin(zscore(d) / T): invariant to the distance's scale and offset."""

    def scores(self, d: np.ndarray) -> np.ndarray:
        return zscore(d)


def _offdiagonal_z(distances: np.ndarray) -> np.ndarray:
    """Each row's z-scores with its own (diagonal) entry excluded (+inf), [n, n]."""
    d = np.array(distances, dtype=np.float64)
    np.fill_diagonal(d, np.inf)
    return np.stack([zscore(row) for row in d])


class ScalarMLP(Operator):
    """softmin(f(zscore(d)) / T) for a trainable f: R -> R applied elementwise, built on an MLP (1 -> 32 -> 32 -> 1,
    ReLU, float64) that is saved and loaded as safetensors (its training history in the metadata)."""

    trainable = True
    min_entries = 3
    hidden = 32

    def __init__(self, state: dict[str, np.ndarray] | None = None):
        import torch

        with torch.random.fork_rng(devices=[]):  # seeded initialisation; torch's global generator left as it was
            torch.manual_seed(0)
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(1, self.hidden), torch.nn.ReLU(),
                torch.nn.Linear(self.hidden, self.hidden), torch.nn.ReLU(),
                torch.nn.Linear(self.hidden, 1),
            ).double()
        self.history: list[float] = []
        if state is not None:
            self.mlp.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})

    def _f(self, z):
        return self.mlp(z.unsqueeze(-1)).squeeze(-1)

    def _reset(self, n: int, seed: int) -> None:
        import torch

        if n < self.min_entries:
            name = next(k for k in OPERATORS.names() if OPERATORS.get(k) is type(self))
            raise LoramixError(f"operator '{name}' needs at least {self.min_entries} bank entries with data to fit")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for layer in self.mlp:
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()

    def scores(self, d: np.ndarray) -> np.ndarray:
        import torch

        z = zscore(d)
        out = np.full_like(z, np.inf)
        finite = np.isfinite(z)
        with torch.no_grad():
            out[finite] = self._f(torch.as_tensor(z[finite])).numpy()
        return out

    def _weights(self, z):
        """softmin(f(z)) of a z-score row (torch, +inf excluded), differentiable in f."""
        import torch

        off = torch.isfinite(z)
        return torch.softmax(-torch.where(off, self._f(torch.where(off, z, 0.0)), torch.inf), dim=-1)

    def to_bytes(self) -> bytes:
        """The fitted MLP as a safetensors file's bytes (its fitting history in the metadata)."""
        from safetensors.torch import save

        state = {k: v.contiguous() for k, v in self.mlp.state_dict().items()}
        return save(state, metadata={"history": json.dumps(self.history)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "ScalarMLP":
        """The operator `to_bytes` wrote."""
        from safetensors.numpy import load

        if not isinstance(data, (bytes, bytearray)):
            raise LoramixError(f"{cls.__name__}.from_bytes(): expected bytes, got {type(data).__name__}")
        try:
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])  # safetensors: length, JSON header
            op = cls(load(bytes(data)))
            op.history = json.loads((header.get("__metadata__") or {}).get("history", "[]"))
        except Exception as e:  # noqa: BLE001 - not bytes to_bytes wrote: JSON, safetensors or the MLP's shapes
            raise LoramixError(f"{cls.__name__}.from_bytes(): not a fitted operator's bytes "
                               f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]})") from None
        return op


def _fit_inputs(distances: Any, gram: Any, epochs: Any, lr: Any, seed: Any) -> tuple[np.ndarray, np.ndarray]:
    """(distances, gram) as float64 [n, n] for Neural.fit, or one LoramixError: square matrices of one size, distances
    finite or +inf off the diagonal, a finite Gram matrix; epochs a whole number >= 0, lr positive and finite."""
    try:
        d = np.array(distances, dtype=np.float64)
        g = np.array(gram, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise LoramixError(f"Neural.fit(): distances and gram must be numbers ({e})") from None
    if d.ndim != 2 or d.shape[0] != d.shape[1] or g.shape != d.shape:
        raise LoramixError(f"Neural.fit(): distances and gram must be square and of one size, got {list(d.shape)} and "
                           f"{list(g.shape)}")
    off = ~np.eye(len(d), dtype=bool)
    if np.isnan(d[off]).any() or np.isneginf(d[off]).any() or not np.isfinite(g).all():
        raise LoramixError("Neural.fit(): distances must be finite or +inf off the diagonal, and gram finite")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 0:
        raise LoramixError(f"Neural.fit(): epochs must be a whole number of at least 0, got {epochs!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not finite_number(lr) or lr <= 0:
        raise LoramixError(f"Neural.fit(): lr must be a positive finite number, got {lr!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise LoramixError(f"Neural.fit(): seed must be int, got {seed!r}")
    check_seed("Neural.fit(): ", int(seed))
    return d, g


@OPERATORS.register("neural")
class Neural(ScalarMLP):
    """softmin(f(zscore(d)) / T), f the MLP. Fitted as the paper's: each entry t is reconstructed from the others,
    C_t = softmin(f(z_t)), with loss mean_t |sum_j C_tj W_j - W_t|^2 over flattened adapters W; written with the
    Gram matrix G = W W^T as mean_t (C_t - e_t) G (C_t - e_t)^T, so the adapters are never held in memory together."""

    parameters = {"epochs": Param(40, "full-batch Adam epochs", low=0, whole=True),
                  "lr": Param(1e-3, "Adam's learning rate", above=0)}

    def fit_bank(self, data: BankFit, *, seed: int = 0) -> "Neural":
        return self.fit(data.distances, data.gram(), epochs=self.epochs, lr=self.lr, seed=seed)

    def fit(self, distances: np.ndarray, gram: np.ndarray, *, epochs: int = 40, lr: float = 1e-3, seed: int = 0) -> "Neural":
        """Fit f on a bank: `distances` [n, n] (diagonal ignored), `gram` [n, n] of the flattened adapters.
        Full-batch Adam (the paper: lr 1e-3, 40 epochs). Returns self; `history` holds the loss per epoch."""
        import torch

        distances, gram = _fit_inputs(distances, gram, epochs, lr, seed)
        n = len(distances)
        self._reset(n, seed)
        z = torch.as_tensor(_offdiagonal_z(distances))
        g = torch.as_tensor(gram)
        g = g / g.diagonal().mean()
        eye = torch.eye(n, dtype=torch.float64)
        opt = torch.optim.Adam(self.mlp.parameters(), lr=lr)
        self.history = []
        for _ in range(epochs):
            e = self._weights(z) - eye
            loss = torch.einsum("ti,ij,tj->", e, g, e) / n
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.history.append(loss.item())
        return self


@OPERATORS.register("neural-answer")
class AnswerTrained(ScalarMLP):
    """softmin((z + g(z)) / T), g the MLP with its last layer zeroed at the start, so training starts from
    `normalized`. Trained on the bank's own leave-one-out: each entry t in turn (shuffled, one Adam step each, for
    `epochs` passes) gets the composition of the others at weights softmin(z_t + g(z_t)), and g follows the gradient
    of t's answer loss ratio to the base model (answer-token cross-entropy of `examples` of t's training samples; the
    update applied exactly by forward hooks, runtime.lora.MixedLoRA). Loads the bank's base model; minutes on a CPU."""

    parameters = {"examples": Param(8, "training samples of each entry its answer loss reads", low=1, whole=True),
                  "epochs": Param(3, "passes over the entries (one Adam step per entry)", low=0, whole=True),
                  "lr": Param(1e-2, "Adam's learning rate", above=0)}

    def _f(self, z):
        return z + self.mlp(z.unsqueeze(-1)).squeeze(-1)

    def fit_bank(self, data: BankFit, *, seed: int = 0) -> "AnswerTrained":
        import torch

        from .progress import bar
        from .runtime.lora import MixedLoRA
        from .runtime.pytorch import answer_loss_fn, frozen_base

        n = len(data.entries)
        self._reset(n, seed)
        last = self.mlp[-1]
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
        z = torch.as_tensor(_offdiagonal_z(data.distances))
        model, tokenizer = frozen_base(data.bank.base_model)
        losses = [answer_loss_fn(model, tokenizer, e.dataset().subsample(self.examples, seed).samples) for e in data.entries]
        mixed = MixedLoRA(model, data.bank, data.entries, data.compose)
        opt = torch.optim.Adam(self.mlp.parameters(), lr=self.lr)
        order = np.random.default_rng(seed)
        self.history = []
        try:
            with torch.no_grad():
                mixed.weights = torch.zeros(n)
                base = [float(fn()) for fn in losses]
            with bar("training the operator (answer loss)", self.epochs * n) as advance:
                for _ in range(self.epochs):
                    total = 0.0
                    for t in order.permutation(n):
                        mixed.weights = self._weights(z[t]).float()
                        ratio = losses[t]() / base[t]
                        opt.zero_grad()
                        ratio.backward()
                        opt.step()
                        total += ratio.item()
                        advance()
                    self.history.append(total / n)
        finally:
            mixed.remove()
        return self


def _distance_row(distances: Any) -> np.ndarray:
    """A distance row as float64 [n]: finite numbers or +inf (excluded); anything else refused in one line."""
    if isinstance(distances, np.ndarray) and distances.dtype.kind not in "biuf":
        raise LoramixError(f"coefficients(): distances must hold numbers, got an array of {distances.dtype}")
    if not isinstance(distances, np.ndarray) and any(isinstance(x, (bool, np.bool_)) or not isinstance(
            x, (int, float, np.integer, np.floating)) for x in distances):
        raise LoramixError("coefficients(): distances must be numbers (+inf excludes an entry)")
    try:
        d = np.array(distances, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as e:
        raise LoramixError(f"coefficients(): distances must be numbers ({e})") from None
    if d.ndim != 1:
        raise LoramixError(f"coefficients(): distances must be one row [n], got shape {list(d.shape)}")
    if np.isnan(d).any() or np.isneginf(d).any():
        raise LoramixError(f"coefficients(): distances must be finite or +inf (excluded), got {d[np.isnan(d) | np.isneginf(d)][0]}")
    return d


@checked
def coefficients(
    distances: np.ndarray | Sequence[Any],  # numbers, +inf excluding an entry (_distance_row)
    operator: str | Operator = "normalized",
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> np.ndarray:
    """Mixing coefficients [n] from a distance row [n]: `operator` is a registered name or a fitted Operator."""
    op = OPERATORS.get(operator)() if isinstance(operator, str) else operator
    if op.trainable and isinstance(operator, str):
        raise LoramixError(f"operator '{operator}' must be fitted on a bank first (Neural().fit or the bank index)")
    return op.coefficients(_distance_row(distances), temperature, None if top_k is None else int(top_k))
