"""loramix.json: how a generated adapter was made, as a typed object (written by `generate` and leave-one-out,
read back with `read_report`)."""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from .checks import fits
from .arguments import checked
from .errors import LoramixError, named
from .files import read_json
from .config import GenerateConfig
from .refine import FinetuneInfo, RefineInfo
from .signatures import SignatureSpec

REPORT_FILE = "loramix.json"


@dataclass
class DataInfo:
    """The user's dataset: where it came from, how many samples, its content fingerprint."""

    path: str | None
    samples: int
    fingerprint: str


@dataclass
class EnergyInfo:
    """Fraction of the exact update's squared Frobenius norm kept by the truncation, per module and summarised
    (None where it was not computed: randomized truncation, 'paper')."""

    mean: float | None
    min: float | None
    per_module: dict[str, float | None]


@dataclass
class CalibrationInfo:
    """The bank calibration `generate` used: the chosen temperature, top-k and scale, and the mean leave-one-out
    answer-loss ratio to the base model (below 1: better than the base) over `entries` bank entries."""

    temperature: float
    top_k: int | None
    scale: float
    loss_ratio: float
    entries: int


@dataclass
class CheckInfo:
    """The held-out check (`--check`): on `examples` held-out samples of the data, each candidate's scores (labels as
    check.check_candidates: 'base', 'x<scale>', 'top<k>', 'entry:<name>'), the `criterion` that ranked them, the
    label `chosen`, and whether it is a composition rather than the base model. Scores: {'loss': answer loss in nats
    per token, 'accuracy': teacher-forced token accuracy, 'exact': fraction of examples answered exactly under teacher
    forcing, and with a generating criterion 'rouge': mean ROUGE-L F1 of the greedy answers}. `runtime`: what ran the
    base model ('torch': the bank's factors mixed exactly; 'llama.cpp': the candidates written as GGUF LoRAs)."""

    examples: int
    criterion: str
    candidates: dict[str, dict[str, float]]
    chosen: str
    beats_base: bool
    runtime: str = "torch"
    coefficients: dict[str, float] = field(default_factory=dict)  # the chosen candidate's: the report's (UNWRITTEN)
    layers: dict[int, dict[str, float]] | None = None  # its per-layer weights, if any (UNWRITTEN)


@dataclass
class CheckPlan:
    """What the held-out check ran (`--check auto` plans it, check.plan_check): `examples` held-out examples (0: no
    check), ranked by `criterion`, with the composition at `scales` and the top `singles` entries alone among the
    candidates. `mode`: 'as asked' (--check N), 'full' (the default form fits --check-budget), 'reduced' (a cheaper form
    that fits) or 'skipped' (none fits); `why` says so in words; `estimate` the seconds the chosen form was estimated
    to take (None when not estimated)."""

    examples: int
    criterion: str
    singles: int
    scales: list[float]
    mode: str
    why: str = ""
    estimate: float | None = None


@dataclass
class Report:
    """The contents of loramix.json. `config`: the GenerateConfig it ran with (a calibration's choices applied);
    `signature` its signature resolved (the model named). `coefficients` and `distances`
    are per usable bank entry (distances only where finite); the coefficients the operator gave sum to `scale`, those a
    weight search chose (`refine`) are the mean over layers of its per-layer weights and may be negative; `excluded`
    lists the entries that got no weight (no training data, with entry_signatures 'data'); `leave_one_out` names the
    held-out entry of a leave-one-out output; `entry_signatures` how the entries were signed (the mode 'auto' chose:
    `signing.signing_mode`), `probed` the entries signed by their answers to the probe prompts; `refine_plan` what
    `refine` auto decided, and why."""

    loramix_version: str
    bank: str
    base_model: str | None
    data: DataInfo
    config: GenerateConfig
    signature: SignatureSpec
    rank: int | None
    coefficients: dict[str, float]
    distances: dict[str, float]
    excluded: list[str]
    energy: EnergyInfo
    scale: float = 1.0
    calibration: CalibrationInfo | None = None
    refine: RefineInfo | None = None
    check: CheckInfo | None = None
    check_plan: CheckPlan | None = None
    refine_plan: str | None = None
    finetune: FinetuneInfo | None = None
    leave_one_out: str | None = None
    entry_signatures: str = "data"
    probed: list[str] = field(default_factory=list)

    distance = property(lambda self: self.config.distance)
    operator = property(lambda self: self.config.operator)
    temperature = property(lambda self: self.config.temperature)
    top_k = property(lambda self: self.config.top_k)
    compose = property(lambda self: self.config.compose)
    seed = property(lambda self: self.config.seed)

    @property
    def probes(self) -> str | None:
        """The probe prompts the probed entries answered (a file, or 'default'); None when no entry was probed."""
        return None if self.entry_signatures == "data" else self.config.probes or "default"

    def to_dict(self) -> dict[str, Any]:
        """As written to loramix.json: optional parts left out when absent."""
        d = asdict(self)
        for key in ("calibration", "refine", "check", "check_plan", "refine_plan", "finetune", "leave_one_out"):
            if d[key] is None:
                del d[key]
        for part, key in UNWRITTEN:
            if isinstance(d.get(part), dict):
                d[part].pop(key, None)
        if d.get("check_plan"):  # its words name settings in the library's terms
            d["check_plan"]["why"] = named(d["check_plan"]["why"])
        if d.get("check"):  # scores to 5 decimals: what tells candidates apart, without the float noise
            d["check"]["candidates"] = {k: {m: round(x, 5) for m, x in v.items()} for k, v in d["check"]["candidates"].items()}
        return d

    def write(self, folder: str | Path) -> None:
        (Path(folder) / REPORT_FILE).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")


# Kept in the Report in memory, never written: what differs between two runs of the same inputs, settings and seed
# (wall-clock seconds), so loramix.json is byte-identical across reruns, and what the report holds already (the check's
# choice is the report's coefficients).
UNWRITTEN = (("refine", "seconds"), ("finetune", "seconds"), ("check", "coefficients"), ("check", "layers"))

_NESTED = {"data": DataInfo, "config": GenerateConfig, "signature": SignatureSpec, "energy": EnergyInfo, "calibration": CalibrationInfo,
           "refine": RefineInfo, "check": CheckInfo, "check_plan": CheckPlan, "finetune": FinetuneInfo}


@checked
def read_report(adapter_dir: str | Path) -> Report:
    """The loramix.json of a generated adapter."""
    path = Path(adapter_dir) / REPORT_FILE
    if not path.is_file():
        raise LoramixError(f"{adapter_dir}: no {REPORT_FILE} (not an adapter written by loramix)")
    raw = read_json(path)
    if isinstance(raw, dict) and "config" not in raw:  # written before the report embedded its configuration
        raw = {**raw, "config": {k: raw[k] for k in _SETTINGS if k in raw}}
    return _build(Report, raw, path)


_SETTINGS = ("distance", "operator", "temperature", "top_k", "compose", "seed", "probes")  # reports before `config`


def _build(cls: type, raw: Any, path: Path, where: str = "") -> Any:
    """`cls` (a dataclass) from the JSON object `raw`, each field checked against its annotation; nested reports are
    built from their own objects."""
    if not isinstance(raw, dict):
        raise LoramixError(f"{path}: field '{where or 'top level'}' must be an object")
    hints = get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        name = f"{where}.{f.name}" if where else f.name
        if f.name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                raise LoramixError(f"{path}: field '{name}' is missing")
            continue
        value, nested = raw[f.name], _NESTED.get(f.name) if cls is Report else None
        if nested is not None and value is not None:
            kwargs[f.name] = _build(nested, value, path, name)
            continue
        if not fits(value, hints[f.name]):
            raise LoramixError(f"{path}: field '{name}' must be {hints[f.name]}, got {repr(value)[:80]}".replace("typing.", ""))
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except LoramixError as e:  # a configuration its own checks refuse
        raise LoramixError(f"{path}: field '{where or 'top level'}': {e.template}") from None
