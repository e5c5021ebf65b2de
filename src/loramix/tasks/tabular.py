"""Classification of table rows written as text, from the toy datasets shipped with scikit-learn."""

from __future__ import annotations

from typing import Iterator

from .core import Family, Pair, pypi

T = Family("tabular", "scikit-learn toy datasets (from the UCI Machine Learning Repository)",
           "BSD-3-Clause (scikit-learn); data CC-BY-4.0 (UCI)", needs=[pypi("sklearn", "scikit-learn")])


def rows(loader: str, keep=lambda name: True) -> Iterator[Pair]:
    """(features as 'name: value, ...', class name) for each row of `sklearn.datasets.<loader>()`, with the
    features whose name `keep` accepts."""
    from sklearn import datasets

    ds = getattr(datasets, loader)()
    cols = [(j, n.replace("_", " ")) for j, n in enumerate(ds.feature_names) if keep(n)]
    for row, y in zip(ds.data, ds.target):
        yield ", ".join(f"{n}: {row[j]:g}" for j, n in cols), str(ds.target_names[y])


@T.task("iris", "Give the species of the iris flower (setosa, versicolor or virginica) from its measurements.",
        source="Iris dataset (R. A. Fisher, 1936), scikit-learn load_iris")
def _iris(rng) -> Iterator[Pair]:
    return rows("load_iris")


@T.task("wine", "Give the cultivar class of the wine (class_0, class_1 or class_2) from its chemical analysis.",
        source="Wine recognition dataset (UCI), scikit-learn load_wine")
def _wine(rng) -> Iterator[Pair]:
    return rows("load_wine")


@T.task("breast_cancer", "Tell whether the breast tumour is malignant or benign from its mean cell-nucleus measurements.",
        source="Breast Cancer Wisconsin (Diagnostic) dataset (UCI), scikit-learn load_breast_cancer")
def _breast_cancer(rng) -> Iterator[Pair]:
    return rows("load_breast_cancer", keep=lambda n: n.startswith("mean "))
