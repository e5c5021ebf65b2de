"""Readers sit above writers: reading a bank or parsing the command line never imports the trainer, the bank
builder or the engines."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module,absent", [
    ("loramix.bank", ["loramix.build", "loramix.engine", "loramix.train"]),
    ("loramix.cli", ["loramix.build", "loramix.train"]),
])
def test_readers_do_not_import_writers(module, absent):
    code = f"import sys, {module}; print([m for m in {absent!r} if m in sys.modules])"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_lazy_names_of_the_package():
    import loramix
    from loramix.index import BankIndex
    from loramix.pipeline import generate

    assert loramix.BankIndex is BankIndex and loramix.generate is generate and callable(loramix.compose)
    with pytest.raises(AttributeError):
        loramix.nothing_of_that_name
