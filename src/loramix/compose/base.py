"""What every composition method is (`Composer`, registered in COMPOSERS) and what they work with: an entry's stored
factors (`LoraFactors`), one weighted term of a module's sum (`Term`), a module's result (`ModuleResult`), the
output's shape (`Shape`), and a scratch `Workspace`. The methods: `exact.py`, `paper.py`."""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Sequence, TypeVar

import torch

from ..adapter import LoraModule
from ..bank import BankEntry
from ..errors import LoramixError
from ..registry import Registry

T = TypeVar("T")
Rank = int | Literal["full"] | None  # an int truncates to that rank; 'full' keeps every singular value; None: default


class LoraFactors:
    """One entry's factors of one module, A [r, in] and B [out, r] in their stored dtype: given, or (`stored`) read
    from the entry's file on first use of `a` or `b`, then checked finite. `into` copies them into a caller's
    buffers instead, a stored entry's straight from disk and unchecked: the caller checks what it computes from them
    (Exact._randomized). Thin QR factorisations are computed on first use and kept, so outputs sharing an entry
    (leave-one-out) factorise it once."""

    def __init__(self, a: torch.Tensor | None = None, b: torch.Tensor | None = None, *,
                 source: tuple[BankEntry, str] | None = None):
        """The factors (a, b), or `source` = (entry, module) to read them from (see `stored`)."""
        if (a is None or b is None) == (source is None):
            raise TypeError("LoraFactors takes the factors (a, b) or source=(entry, module)")
        self._ab = None if source else (a, b)
        self._source = source
        self.rank = source[0].adapter.modules[source[1]].rank if source else a.shape[0]
        self._qr: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}
        self._lock = threading.Lock()  # outputs composed in parallel share it

    @classmethod
    def stored(cls, entry: BankEntry, module: str) -> "LoraFactors":
        """The factors of `module` as `entry`'s file stores them, read on first use."""
        return cls(source=(entry, module))

    @property
    def origin(self) -> str:
        """What the factors are, for error messages."""
        return f"{self._source[0].name}: module '{self._source[1]}'" if self._source else "factors"

    @property
    def a(self) -> torch.Tensor:
        return self._loaded()[0]

    @property
    def b(self) -> torch.Tensor:
        return self._loaded()[1]

    def _loaded(self) -> tuple[torch.Tensor, torch.Tensor]:
        with self._lock:
            if self._ab is None:
                entry, module = self._source
                a, b = entry.adapter.factors(module)
                if not (_finite(a) and _finite(b)):
                    raise self.nonfinite()
                self._ab = a, b
            return self._ab

    def nonfinite(self) -> LoramixError:
        return LoramixError(f"{self.origin} has NaN or Inf weights")

    def into(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Copy A into `a` [r, in] and B into `b` [out, r] (converted to their dtypes), unchecked."""
        if self._ab is None:
            entry, module = self._source
            entry.adapter.read_into(module, a, b)
        else:
            a.copy_(self._ab[0])
            b.copy_(self._ab[1])

    def qr(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """(Q_a^T [r', in], R_a [r', r], Q_b^T [r'', out], R_b [r'', r]) with A^T = Q_a R_a and B = Q_b R_b, in
        `dtype`; the Q factors transposed (contiguous rows), so that stacking them is a plain copy."""
        a, b = self._loaded()
        with self._lock:
            if dtype not in self._qr:
                q_a, r_a = torch.linalg.qr(a.to(dtype).T)
                q_b, r_b = torch.linalg.qr(b.to(dtype))
                self._qr[dtype] = (q_a.T.contiguous(), r_a, q_b.T.contiguous(), r_b)
            return self._qr[dtype]


class Workspace:
    """Buffers that successive calls reuse, one call at a time (the modules of one serial pass over a bank): fresh
    memory costs a page fault per 4 KiB page on first touch, more here than the copy that then fills it."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape` and `dtype`, contents undefined: buffer `name`, grown when too small."""
        n = math.prod(shape)
        buf = self._buffers.get((name, dtype))
        if buf is None or buf.numel() < n:
            self._buffers.pop((name, dtype), None)
            buf = self._buffers[(name, dtype)] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)


@dataclass
class Term:
    """One entry's contribution to a module: coefficient * scale * B @ A (scale: the entry's PEFT scaling)."""

    factors: LoraFactors
    coefficient: float
    scale: float


@dataclass
class ModuleResult:
    """A composed module: delta_W = scale * B @ A, with the fraction of the exact update's energy it keeps."""

    a: torch.Tensor  # [k, in]
    b: torch.Tensor  # [out, k]
    scale: float
    energy: float | None = 1.0  # |truncated|_F^2 / |exact|_F^2; None when not computed (randomized)
    singular_values: list[float] = field(default_factory=list)


@dataclass
class Shape:
    """An output's shape: `target` rank handed to `module` (None: keep every singular value, or the entries'
    own), each module's stored rank and PEFT scale, and the rank the report states (None: the entries' own)."""

    target: int | None
    ranks: dict[str, int]
    scales: dict[str, float]
    rank: int | None


class Composer:
    """A composition method. A subclass registered in COMPOSERS declares all that its name implies:

    - `validate(rank)`: refuse a rank option it cannot honour (called with the configuration, before any work);
    - `check(entries)`: refuse bank entries it cannot compose correctly (before any tensor is read);
    - `shape(refs, active, rank)`: the output's ranks and scales per module;
    - `module(terms, ref, target)`: one composed module; during a serial pass the executor lends it `workspace`,
      buffers that successive modules reuse (None otherwise);
    - `operator_space`: the space in which a trained operator reconstructs adapters ('updates' or 'params',
      see operators.gram_matrix);
    - `mix(x, a, b, w, k)`: the composed module's output for refinement, differentiable in the weights, or
      `refinable = False` when refinement cannot mix this method;
    - `serial(active, target)`: True when modules must run one at a time with multi-threaded ops (memory-bound
      work); otherwise modules (and outputs) run in parallel threads, each op single-threaded."""

    name: ClassVar[str]
    operator_space: ClassVar[str] = "updates"
    refinable: ClassVar[bool] = True
    workspace: "Workspace | None" = None

    @classmethod
    def validate(cls, rank: Rank) -> None:
        if rank not in (None, "full") and not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
            raise LoramixError(f"rank must be at least 1 or 'full', got {rank!r}")

    def check(self, entries: Sequence[BankEntry]) -> None:
        """Raise LoramixError if these entries cannot be composed correctly by this method."""

    def shape(self, refs: dict[str, LoraModule], active: Sequence[BankEntry], rank: Rank, max_rank: int) -> Shape:
        raise NotImplementedError

    def module(self, terms: list["Term"], ref: LoraModule, target: int | None) -> "ModuleResult":
        """Compose one module from its terms; `ref` is the module as one bank entry has it (shape, rank, scale)."""
        raise NotImplementedError

    def mix(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
        """The update's output on inputs x [..., in]: a [R, in] the k entries' A stacked, b [out, R] their scaled
        B side by side, w [R] each rank-1 piece's entry weight. Returns [..., out]."""
        raise NotImplementedError

    def serial(self, active: Sequence[BankEntry], target: int | None) -> bool:
        return False


COMPOSERS: Registry[type[Composer]] = Registry("composition")


def stacked_ranks(entries: Sequence[BankEntry]) -> dict[str, int]:
    """Module -> the sum of the entries' ranks there (the stacked rank R of an exact composition)."""
    stacked: Counter = Counter()
    for e in entries:
        for name, m in e.adapter.modules.items():
            stacked[name] += m.rank
    return dict(stacked)


def _finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in `t`: its min and max in one pass (NaN propagates), without a boolean copy of `t`."""
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())
