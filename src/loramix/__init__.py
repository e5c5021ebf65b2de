"""loramix: a task-specific LoRA adapter composed from a bank of LoRAs, on CPU, without gradient training.

    import loramix
    result = loramix.generate("my_bank/", "my_task.jsonl", "out/adapter")
    print(result.top(5))
"""

import importlib
import os
import signal
import sys


def _interrupted_at_start(*_) -> None:
    sys.stderr.write("interrupted\n")
    os._exit(130)


# The `loramix` command: Ctrl-C while it imports (seconds: torch, transformers) is one word, not a traceback; nothing
# is written before the command runs, and cli.main puts Python's own handler back first.
if os.path.basename(sys.argv[0] if sys.argv else "") == "loramix" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_at_start)

from .adapter import LoraAdapter, save_adapter
from .bank import Bank, BankEntry
from .compose import COMPOSERS, Composition, compose, gram_matrix
from .data import Dataset, Sample, read_dataset
from .distances import DISTANCES, distance_matrix, distance_row
from .errors import LoramixError
from .operators import OPERATORS, Neural, coefficients, softmin
from .report import Report, read_report
from .signatures import SIGNATURES, SignatureSpec, make_signer
from .version import __version__

# Imported on first use: the bank index and the pipeline run the engines (loramix.engine), which a reader of
# banks or adapters (`import loramix.bank`) does not need.
_LAZY = {"BankIndex": "index", "GenerateConfig": "config", "GenerateResult": "pipeline", "generate": "pipeline"}

__all__ = [
    "Bank", "BankEntry", "BankIndex", "COMPOSERS", "Composition", "DISTANCES", "Dataset", "GenerateConfig",
    "GenerateResult", "LoraAdapter", "LoramixError", "Neural", "OPERATORS", "Report", "SIGNATURES", "Sample",
    "SignatureSpec", "__version__", "coefficients", "compose", "distance_matrix", "distance_row", "generate",
    "gram_matrix", "make_signer", "read_dataset", "read_report", "save_adapter", "softmin",
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
