"""loramix: a task-specific LoRA adapter composed from a bank of LoRAs, on CPU, without gradient training.

    import loramix
    result = loramix.generate("my_bank/", "my_task.jsonl", "out/adapter")
    print(result.top(5))
"""

__version__ = "0.1.0"

from .adapter import LoraAdapter, save_adapter  # noqa: E402
from .bank import Bank, BankEntry  # noqa: E402
from .compose import COMPOSERS, Composition, compose  # noqa: E402
from .config import GenerateConfig  # noqa: E402
from .data import Dataset, Sample, read_dataset  # noqa: E402
from .distances import DISTANCES, distance_matrix, distance_row  # noqa: E402
from .errors import LoramixError  # noqa: E402
from .index import BankIndex  # noqa: E402
from .operators import OPERATORS, Neural, coefficients, gram_matrix, softmin  # noqa: E402
from .pipeline import GenerateResult, generate  # noqa: E402
from .report import Report, read_report  # noqa: E402
from .signatures import SIGNATURES, SignatureSpec, make_signer  # noqa: E402

__all__ = [
    "Bank", "BankEntry", "BankIndex", "COMPOSERS", "Composition", "DISTANCES", "Dataset", "GenerateConfig",
    "GenerateResult", "LoraAdapter", "LoramixError", "Neural", "OPERATORS", "Report", "SIGNATURES", "Sample", "SignatureSpec",
    "coefficients", "compose", "distance_matrix", "distance_row", "generate", "gram_matrix", "make_signer",
    "read_dataset", "read_report", "save_adapter", "softmin",
]
