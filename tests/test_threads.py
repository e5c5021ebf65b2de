"""Results do not depend on the number of threads: signatures (embed, hidden, unigram), distances, coefficients
and adapter bytes are the same at 1, 2 and 3 threads; the thread count is never left changed."""

import threading
import time

import numpy as np
import pytest
import torch
from helpers import at_threads, make_bank, topic_records, write_jsonl
from threadpoolctl import threadpool_limits

from loramix import Bank, BankIndex, Dataset, Sample, SignatureSpec, generate, make_signer
from loramix.distances import DISTANCES, distance_matrix
from loramix.threads import threaded_map


def _fresh_thread_count() -> int:
    """torch's thread count as a new thread starts with it (the process-wide setting)."""
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(torch.get_num_threads()))
    t.start()
    t.join()
    return out[0]


def dataset(n: int = 40) -> Dataset:
    records = topic_records("fruits", n // 2) + topic_records("music", n - n // 2)
    # lengths spread so that batches pad to different widths
    return Dataset([Sample(r["input"] + " and" * (i % 7), tuple(r["output"])) for i, r in enumerate(records)], "mix")


@pytest.mark.parametrize("method", [pytest.param("embed", marks=pytest.mark.slow), "hidden", "unigram"])
def test_signatures_do_not_depend_on_the_thread_count(method, tiny_base):
    spec = SignatureSpec(method, None if method == "embed" else str(tiny_base), max_samples=None).resolved(None)
    signer = make_signer(spec)
    for size in (1, 5, 8, 40):  # small batches are where multi-threaded kernels differed (by ~1e-7)
        ds = Dataset(dataset().samples[:size], str(size))
        sigs = [at_threads(n, lambda: signer(ds)) for n in (1, 2, 3, 1)]
        assert all(np.array_equal(sigs[0], s) for s in sigs[1:]), size
    if method == "embed":  # and the rows are those of a one-sample-at-a-time encoding, up to float rounding
        one = np.concatenate([signer(Dataset([s], "one")) for s in ds.samples])
        assert np.allclose(sigs[0], one, atol=1e-5)


def test_distances_do_not_depend_on_the_blas_thread_count():
    signer = make_signer(SignatureSpec("embed", max_samples=None).resolved(None))
    samples = dataset().samples
    sigs = [signer(Dataset(samples[i : i + 10], str(i))) for i in range(0, 40, 10)]
    for name in (n for n in DISTANCES.names() if DISTANCES.get(n).kind == "cloud"):
        matrices = []
        for n in (1, 2, 3):
            with threadpool_limits(n):
                matrices.append(distance_matrix(name, sigs))
        assert all(np.array_equal(matrices[0], m) for m in matrices[1:]), name


def test_generate_writes_the_same_bytes_at_any_thread_count(tmp_path):
    data = write_jsonl(tmp_path / "task.jsonl", topic_records("fruits", 20))
    outs = []
    for n in (1, 3):
        bank = make_bank(tmp_path / f"bank{n}", n=6)  # each its own index: signatures computed at n threads
        at_threads(n, lambda: generate(bank, data, tmp_path / f"out{n}", max_samples=16, check=0))
        outs.append(tmp_path / f"out{n}")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes()
    sigs = [BankIndex(Bank(tmp_path / f"bank{n}")).signatures(SignatureSpec(max_samples=16)) for n in (1, 3)]
    assert all(np.array_equal(a, b) for a, b in zip(*sigs))


def test_threaded_map_leaves_the_thread_count_as_it_found_it():
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert list(threaded_map(lambda x: (x, torch.get_num_threads()), range(5))) == [(x, 1) for x in range(5)]
        assert torch.get_num_threads() == 2 and _fresh_thread_count() == 2

        def slow(x):
            time.sleep(0.05)
            return x

        abandoned = threaded_map(slow, range(20))
        assert next(abandoned) == 0  # then never consumed again nor closed (the reference is kept alive)
        deadline = time.time() + 10
        while _fresh_thread_count() != 2 and time.time() < deadline:
            time.sleep(0.05)
        assert torch.get_num_threads() == 2 and _fresh_thread_count() == 2

        def fail(x):
            raise ValueError(x)

        with pytest.raises(ValueError):
            list(threaded_map(fail, range(3)))
        assert torch.get_num_threads() == 2 and _fresh_thread_count() == 2
        del abandoned
    finally:
        torch.set_num_threads(saved)
