"""Adding a variant of any stage is one class or function, registered in one place: toy variants of a signature,
a distance, an operator (plain and trained) and a composition method run `generate` end to end. And every
invalid choice is refused before any signature is computed."""

import json

import numpy as np
import pytest
import torch
from helpers import make_bank, topic_records, write_jsonl

from peft.utils import load_peft_weights

from loramix import (COMPOSERS, DISTANCES, OPERATORS, SIGNATURES, Bank, BankIndex, GenerateConfig, LoramixError,
                     SignatureSpec, generate, read_report)
from loramix.compose.base import Composer, ModuleResult, Shape, stacked_ranks
from loramix.data import Dataset, Sample
from loramix.distances import distance_row, register_distance
from loramix.operators import Operator, softmin
from loramix.refine import REFINE_METHODS, RefineMethod
from loramix.registry import Param
from loramix.runtime.scores import CRITERIA, Criterion, register_criterion
from loramix.signatures import Signer, make_signer
from loramix.signing import SIGNING_MODES, SigningMode

TOY_BANK_SIZE = 5


@pytest.fixture
def registries(monkeypatch):
    """Every registry restored after the test: variants registered inside it do not leak."""
    for reg in (SIGNATURES, DISTANCES, OPERATORS, COMPOSERS, CRITERIA, REFINE_METHODS, SIGNING_MODES):
        monkeypatch.setattr(reg, "_items", dict(reg._items))


def register_toys():
    @SIGNATURES.register("toy-lengths")
    class Lengths(Signer):
        """[n, 2]: the lengths (characters) of input and output."""

        kind = "cloud"

        def compute(self, dataset):
            return np.array([[len(s.input), len(s.output)] for s in dataset], dtype=np.float32)

    @register_distance("toy-mean", "cloud")
    def mean_gap(x, y, seed=0):
        """|mean(x) - mean(y)|."""
        return float(np.linalg.norm(x.mean(0) - y.mean(0)))

    @OPERATORS.register("toy-nearest")
    class Nearest(Operator):
        """All the weight on the nearest entries (ties share it)."""

        def scores(self, d):
            return np.where(np.asarray(d) <= np.min(d) + 1e-9, 0.0, np.inf)

    @OPERATORS.register("toy-trained")
    class Trained(Operator):
        """softmin(d / (s * stretch)), s fitted as the mean off-diagonal bank distance, `stretch` a declared
        parameter; saved as JSON."""

        trainable = True
        min_entries = 2
        fits = 0
        parameters = {"stretch": Param(1.0, "multiplies the fitted scale", above=0)}

        def __init__(self, scale=1.0):
            self.scale = scale

        def scores(self, d):
            return np.asarray(d, dtype=np.float64) / self.scale

        def fit_bank(self, data, *, seed=0):
            type(self).fits += 1
            off = data.distances[~np.eye(len(data.distances), dtype=bool)]
            self.scale = (float(off.mean()) or 1.0) * self.stretch
            self.history = [self.scale]
            return self

        def to_bytes(self):
            return json.dumps(self.scale).encode()

        @classmethod
        def from_bytes(cls, data):
            return cls(json.loads(data))

    @COMPOSERS.register("toy-stack")
    class Stack(Composer):
        """The exact sum kept at its full stacked rank: B = [c_i s_i B_i], A = [A_i] (no truncation)."""

        name = "toy-stack"

        @classmethod
        def validate(cls, rank):
            if rank is not None:
                raise LoramixError("toy-stack keeps the stacked rank")

        def shape(self, refs, active, rank, max_rank):
            width = max(stacked_ranks(active).values())
            return Shape(None, {m: width for m in refs}, {m: 1.0 for m in refs}, width)

        def module(self, terms, ref, target):
            b = torch.cat([t.coefficient * t.scale * t.factors.b.double() for t in terms], dim=1)
            a = torch.cat([t.factors.a.double() for t in terms])
            return ModuleResult(a, b, 1.0)

        def mix(self, x, a, b, w, k):
            return ((x @ a.T) * w) @ b.T

    @COMPOSERS.register("toy-frozen")
    class Frozen(Stack):
        """As toy-stack, but refinement cannot mix it."""

        name = "toy-frozen"
        refinable = False

    return Trained


def dense_update(bank: Bank, coefficients: dict[str, float], module: str) -> torch.Tensor:
    total = 0
    for e in bank.entries:
        if coefficients.get(e.name) and module in e.adapter.modules:
            a, b = e.adapter.factors(module)
            total = total + coefficients[e.name] * e.adapter.modules[module].scale * (b.double() @ a.double())
    return total


def test_toy_variants_of_every_stage_run_generate_end_to_end(registries, tmp_path):
    trained = register_toys()
    bank_dir = make_bank(tmp_path / "bank", n=TOY_BANK_SIZE)
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("colors", 12))
    for operator in ("toy-nearest", "toy-trained"):
        out = tmp_path / operator
        options = {"stretch": 2.0} if operator == "toy-trained" else None
        result = generate(bank_dir, data, out, signature="toy-lengths", distance="toy-mean", operator=operator,
                          operator_options=options, compose="toy-stack", max_samples=8, check=0)
        report = read_report(out)
        assert (report.signature.method, report.distance, report.operator, report.compose) == (
            "toy-lengths", "toy-mean", operator, "toy-stack")
        bank = Bank(bank_dir)
        d = np.array([result.distances[e.name] for e in bank.usable])
        if operator == "toy-nearest":
            want = np.where(d <= d.min() + 1e-9, 1.0, 0.0) / np.count_nonzero(d <= d.min() + 1e-9)
        else:  # fitted on the bank's own distance matrix, through the index
            matrix = BankIndex(bank).distance_matrix(SignatureSpec("toy-lengths", max_samples=8), "toy-mean")
            scale = matrix[~np.eye(len(matrix), dtype=bool)].mean()
            want = softmin(d / (2.0 * scale))  # the declared parameter reached the fit
            assert trained.fits == 1
        c = np.array([result.coefficients[e.name] for e in bank.usable])
        assert np.allclose(c, want)
        # the output is the exact weighted sum of the entries' updates, at the stacked rank
        weights = load_peft_weights(str(out))
        for module in bank.shapes:
            key = f"base_model.model.{module}"
            got = weights[f"{key}.lora_B.weight"].double() @ weights[f"{key}.lora_A.weight"].double()
            assert torch.allclose(got, dense_update(bank, result.coefficients, module), atol=1e-6)
    generate(bank_dir, data, tmp_path / "again", signature="toy-lengths", distance="toy-mean", operator="toy-trained",
             operator_options={"stretch": 2.0}, compose="toy-stack", max_samples=8, check=0)
    assert trained.fits == 1  # the trained operator is cached with the bank index, found through its registry


def register_later_toys():
    """A check criterion, a refine method (a weight search) and an entry-signing mode, each registered in one place."""
    register_criterion(Criterion("toy-worst-loss", lambda s: -s.loss, help="the largest answer loss (a toy)"))

    @REFINE_METHODS.register("toy-halve")
    class Halve(RefineMethod):
        """Tries the start and the start times `factor` (a declared parameter); keeps the lower objective."""

        name = "toy-halve"
        steps = 2
        parameters = {"factor": Param(0.5, "what the start is multiplied by", above=0)}

        def search(self, mixed, objective, w0, cfg, deadline):
            tried = (w0, w0 * cfg.options["factor"])
            history = [float(objective(torch.tensor(w, dtype=torch.float32))) for w in tried]
            best = int(np.argmin(history))
            return tried[best], history[best], history

    @SIGNING_MODES.register("toy-names")
    class Names(SigningMode):
        """Every entry signed by a one-sample dataset of its name (no data, no base model)."""

        name = "toy-names"
        probes = False

        def sigs(self, index, spec):
            signer = make_signer(spec)
            return [signer(Dataset([Sample(e.name, (e.name,))], e.name)) for e in index.bank.entries]

        def row(self, index, spec, distance, user, seed, probe_sigs):
            return distance_row(distance, user, self.sigs(index, spec), seed)

        def matrix(self, index, spec, distance, seed, data, cross):
            usable = [index.bank.entries.index(e) for e in index.bank.usable]
            sigs = self.sigs(index, spec)
            return np.stack([distance_row(distance, sigs[i], sigs, seed) for i in usable])


def test_toy_criterion_refine_method_and_signing_mode_run_generate_end_to_end(registries, tmp_path, tiny_base):
    register_toys()
    register_later_toys()
    bank_dir = make_bank(tmp_path / "bank", n=TOY_BANK_SIZE, base=str(tiny_base))
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("colors", 12))
    out = tmp_path / "out"
    result = generate(bank_dir, data, out, signature="toy-lengths", distance="toy-mean", entry_signatures="toy-names",
                      refine=4, refine_method="toy-halve", refine_options={"factor": 0.25}, check=4, check_criterion="toy-worst-loss", check_singles=1,
                      max_samples=8, top_k=3, refine_per_layer=False)
    report = read_report(out)
    assert report.entry_signatures == "toy-names" and report.probed == [] and report.excluded == []
    bank = Bank(bank_dir)
    signer = make_signer(SignatureSpec("toy-lengths", max_samples=8))
    names = [signer(Dataset([Sample(e.name, (e.name,))], e.name)) for e in bank.entries]
    from loramix.data import read_dataset

    want = distance_row("toy-mean", signer(read_dataset(data)), names)
    assert np.allclose([report.distances[e.name] for e in bank.entries], want)  # the toy mode's distances
    assert report.refine.method == "toy-halve" and report.refine.steps == 2
    r = report.refine
    assert r.loss == pytest.approx(min(r.history), abs=1e-5)
    top = sorted(r.meta_coefficients, key=lambda n: -r.meta_coefficients[n])[:3]  # top_k=3 searched, the rest 0
    factor = 0.25 if r.history[1] < r.history[0] else 1.0  # the declared parameter, as given
    assert r.coefficients == pytest.approx({n: factor * w if n in top else 0.0 for n, w in r.meta_coefficients.items()})
    check = report.check
    assert check.criterion == "toy-worst-loss"
    assert check.chosen == max(check.candidates, key=lambda k: check.candidates[k]["loss"])  # the toy's choice
    from loramix.check import check_candidates

    assert result.coefficients == pytest.approx(check_candidates(r.coefficients, singles=1)[check.chosen])
    # each toy is a choice of the CLI too, in its option's help
    assert GenerateConfig(entry_signatures="toy-names", refine_method="toy-halve", check_criterion="toy-worst-loss")


def test_refining_a_method_that_cannot_be_mixed_is_refused(registries, tmp_path):
    register_toys()
    with pytest.raises(LoramixError, match="cannot be refined by a weight search"):
        GenerateConfig(compose="toy-frozen", refine=4, refine_method="gradient")
    assert GenerateConfig(compose="toy-frozen", refine=4).refine_method == "finetune"  # trains the composed adapter


INVALID = {
    "unknown signature": {"signature": "nope"},
    "unknown distance": {"distance": "nope"},
    "distance of another kind": {"distance": "kl"},
    "unknown operator": {"operator": "nope"},
    "unknown composition": {"compose": "nope"},
    "rank with paper": {"compose": "paper", "rank": 4},
    "rank zero": {"rank": 0},
    "rank text": {"rank": "half"},
    "top-k zero": {"top_k": 0},
    "temperature zero": {"temperature": 0.0},
    "temperature infinite": {"temperature": float("inf")},
    "temperature NaN": {"temperature": float("nan")},
    "max samples zero": {"max_samples": 0},
    "negative refine": {"refine": -1},
    "unknown refine method": {"refine": 2, "refine_method": "nope"},
    "negative budget": {"refine": 2, "refine_budget": -1.0},
    "unknown dtype": {"dtype": "int8"},
    "undeclared operator parameter": {"operator_options": {"lr": 0.1}},
    "operator parameter out of bounds": {"operator": "neural", "operator_options": {"epochs": -1}},
    "undeclared refine parameter": {"refine": 2, "refine_options": {"momentum": 0.9}},
    "refine bounds crossed": {"refine": 2, "refine_method": "gradient", "refine_options": {"lower": 1.0, "upper": 0.5}},
}


@pytest.mark.parametrize("overrides", INVALID.values(), ids=INVALID.keys())
def test_invalid_choices_are_refused_before_any_signature(overrides, tmp_path, monkeypatch):
    def no_signatures(self, dataset):
        raise AssertionError("a signature was computed before the refusal")

    monkeypatch.setattr(Signer, "__call__", no_signatures)
    bank = make_bank(tmp_path / "bank", n=3)
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("colors", 6))
    with pytest.raises(LoramixError):
        generate(bank, data, tmp_path / "out", check=0, **overrides)
    assert not (tmp_path / "out").exists()


def test_bank_level_refusals_come_before_any_signature(tmp_path, monkeypatch):
    def no_signatures(self, dataset):
        raise AssertionError("a signature was computed before the refusal")

    monkeypatch.setattr(Signer, "__call__", no_signatures)
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("colors", 6))
    two = make_bank(tmp_path / "two", n=2)
    with pytest.raises(LoramixError, match="at least 3"):
        generate(two, data, tmp_path / "o1", operator="neural", check=0)
    mixed = make_bank(tmp_path / "mixed", n=3, mixed=True)
    with pytest.raises(LoramixError, match="equal ranks and scales"):
        generate(mixed, data, tmp_path / "o2", compose="paper", check=0)
    nameless = make_bank(tmp_path / "nameless", n=3, base=None)
    with pytest.raises(LoramixError, match="needs the base model"):
        generate(nameless, data, tmp_path / "o3", signature="hidden", distance="w2", check=0)


def test_cli_options_are_generated_from_the_config(tmp_path):
    """Every GenerateConfig field is a `generate` option with its help text; the method fields are `bank loo`'s."""
    import dataclasses

    from typer.testing import CliRunner

    from loramix.cli import app

    runner = CliRunner()
    helps = {cmd: " ".join(runner.invoke(app, [*cmd.split(), "--help"], env={"COLUMNS": "400"}).output.replace("│", " ").split())
             for cmd in ("generate", "bank loo")}  # the help text with rich's wrapping undone
    for f in dataclasses.fields(GenerateConfig):
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        assert flag in helps["generate"] and f.metadata["help"].split(":")[0] in helps["generate"], f.name
        assert (flag in helps["bank loo"]) == f.metadata["method"], f.name
    bank = make_bank(tmp_path / "bank", n=3)
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("colors", 6))
    r = runner.invoke(app, ["generate", "--bank", str(bank), "--data", str(data), "--out", str(tmp_path / "out"),
                            "--temperature", "2.5", "--top-k", "2", "--rank", "3", "--max-samples", "4", "--seed", "7", "--check", "0"])
    assert r.exit_code == 0, r.output
    report = read_report(tmp_path / "out")
    assert (report.temperature, report.top_k, report.rank, report.seed, report.signature.max_samples) == (2.5, 2, 3, 7, 4)


def test_built_in_variants_take_their_declared_parameters(tmp_path, tiny_base):
    """The neural operator's epochs and the gradient search's learning rate, set by name from Python and the CLI,
    reach the fit and the search, and the report keeps them in its config."""
    from typer.testing import CliRunner

    from loramix.cli import app

    bank_dir = make_bank(tmp_path / "bank", n=TOY_BANK_SIZE, base=str(tiny_base))
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("colors", 12))
    generate(bank_dir, data, tmp_path / "neural", operator="neural", operator_options={"epochs": 3}, max_samples=8, check=0)
    report = read_report(tmp_path / "neural")
    assert report.config.operator_options == {"epochs": 3}
    fitted = BankIndex(Bank(bank_dir)).fitted_operator("neural", report.signature, report.distance, "exact", 0, {"epochs": 3})
    assert len(fitted.history) == 3  # cached by the run above, with its parameters in the key
    r = CliRunner().invoke(app, ["generate", "--bank", str(bank_dir), "--data", str(data), "--out", str(tmp_path / "grad"),
                                 "--refine", "4", "--refine-method", "gradient", "--refine-option", "lr=0.2",
                                 "--refine-option", "upper=1", "--refine-steps", "2", "--check", "0", "--max-samples", "8"])
    assert r.exit_code == 0, r.output
    report = read_report(tmp_path / "grad")
    assert report.config.refine_options == {"lr": 0.2, "upper": 1.0} and report.refine.steps == 2
    assert max(report.refine.coefficients.values()) <= 1.0
