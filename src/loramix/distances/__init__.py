"""Stage 3: distances between two signatures (empirical distributions).

On token-id unigrams (1-D int arrays), the paper's code: `wd`, `kl`, `js`, `mmd` (seeded here; `tokens.py`).
On point clouds ([n, d] float arrays): `w2`, `sliced`, `mmd-rbf`, `gaussian-w2` (`clouds.py`).
The registry and the one way to compute rows and matrices: `core.py`."""

from . import clouds, tokens  # noqa: F401  (they register their distances)
from .core import (DISTANCES, MAX_TOKEN_ID, Distance, aligned, distance_matrix, distance_row, get_distance,
                   register_batched, register_distance)

__all__ = ["DISTANCES", "MAX_TOKEN_ID", "Distance", "aligned", "distance_matrix", "distance_row", "get_distance",
           "register_batched", "register_distance"]
