"""How answers are scored: ROUGE-L, exact match and containment against a record's references (as
Natural-Instructions scores them), a model's teacher-forced `AnswerScores` on labelled samples, and the registered
`CRITERIA` that rank candidates by them. Backend-free: both runtimes fill AnswerScores."""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

from ..errors import LoramixError
from ..registry import Registry


def normalize(text: str) -> str:
    """SQuAD-style answer normalisation: lowercase, no punctuation, no articles (a, an, the), single spaces."""
    if not isinstance(text, str):
        raise LoramixError(f"normalize(): text must be str, got {type(text).__name__}")
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


class _Tokenizer:
    """rouge-score's default tokenisation (lowercase, Porter stemming of tokens longer than 3 characters),
    except that letters outside ASCII and symbols are kept as tokens: 'élève' or an emoji is not dropped."""

    def __init__(self) -> None:
        from nltk.stem import porter

        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        tokens = re.findall(r"\w+|[^\w\s]", unicodedata.normalize("NFC", text.lower()))
        tokens = [t for t in tokens if t.isalnum() or unicodedata.category(t[0]).startswith("S")]
        return [self._stemmer.stem(t) if len(t) > 3 and t.isascii() else t for t in tokens]


@dataclass
class Scorer:
    """Scores one prediction against its references: (rougeL F1, exact match 0/1, contains 0/1), best of refs."""

    def __post_init__(self) -> None:
        from rouge_score import rouge_scorer

        self._rouge = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())

    def __call__(self, prediction: str, references: tuple[str, ...]) -> tuple[float, float, float]:
        pred = normalize(prediction)
        refs = [normalize(ref) for ref in references]
        rouge = max(self._rouge.score(ref, prediction)["rougeL"].fmeasure for ref in references)
        exact = float(any(pred == ref for ref in refs))
        contains = float(any(ref and ref in pred for ref in refs))
        return rouge, exact, contains


def score(predictions: list[str], dataset: Sequence[Any]) -> dict[str, float]:
    """Mean rougeL, exact_match and contains over the records (a Dataset or its samples: `.outputs`), and n:
    one prediction (a string) per record, at least one record."""
    records = list(dataset)
    if isinstance(predictions, (str, bytes)) or not all(isinstance(p, str) for p in predictions):
        raise LoramixError("score: predictions must be a list of strings, one per record")
    if len(predictions) != len(records) or not records:
        raise LoramixError(f"score: {len(predictions)} prediction(s) for {len(records)} record(s); one per record, "
                           "at least one")
    scorer = Scorer()
    rows = [scorer(p, s.outputs) for p, s in zip(predictions, records)]
    n = len(rows)
    return {
        "rougeL": sum(r[0] for r in rows) / n,
        "exact_match": sum(r[1] for r in rows) / n,
        "contains": sum(r[2] for r in rows) / n,
        "n": n,
    }


@dataclass(frozen=True)
class AnswerScores:
    """Scores of a model on labelled samples. Teacher-forced: `loss`, the mean answer-token cross-entropy (nats per
    token); `accuracy`, the fraction of answer tokens (end-of-turn included) that are the model's most likely next
    token given the reference before them; `exact`, the fraction of samples whose every answer token is, i.e. that
    greedy decoding reproduces exactly (up to ties). Generated (only when asked for: it decodes every sample):
    `rouge`, the mean ROUGE-L F1 of the greedy answers against the references, as `loramix evaluate` scores them."""

    loss: float
    accuracy: float
    exact: float
    rouge: float | None = None


@dataclass(frozen=True)
class Criterion:
    """How a choice among candidates ranks their AnswerScores: `key` (the smallest wins; ties broken by the tuple's
    later items); `generates`: it reads `rouge`, so the candidates' greedy answers are decoded (a forward-only
    criterion costs one forward pass per candidate); `tolerance`: ROUGE-L differences below this many examples' worth
    (tolerance / n on n examples) are no evidence: the candidates that close to the best are ranked by `key` without
    their ROUGE-L (so one lucky example does not decide)."""

    name: str
    key: Callable[[AnswerScores], Any]
    generates: bool = False
    help: str = ""
    tolerance: float = 0.0

    def choose(self, scores: Mapping[str, AnswerScores], examples: int) -> str:
        """The label of `scores` (candidate -> AnswerScores on `examples` examples) this criterion prefers; ties go to
        the earlier candidate."""
        pool = list(scores)
        if self.tolerance and examples:
            best = max(scores[k].rouge for k in pool)
            pool = [k for k in pool if scores[k].rouge >= best - self.tolerance / examples - 1e-12]
            return min(pool, key=lambda k: self.key(replace(scores[k], rouge=0.0)))
        return min(pool, key=lambda k: self.key(scores[k]))


CRITERIA: Registry[Criterion] = Registry("check criterion")


def register_criterion(criterion: Criterion) -> Criterion:
    """Register `criterion` under its name (check --check-criterion's choices)."""
    return CRITERIA.register(criterion.name)(criterion)


register_criterion(Criterion("loss", lambda s: s.loss, help="answer loss (nats per token)"))
register_criterion(Criterion("accuracy", lambda s: (-s.accuracy, s.loss), help="token accuracy, then loss"))
register_criterion(Criterion("exact", lambda s: (-s.exact, -s.accuracy, s.loss),
                             help="teacher-forced exact match, then accuracy, then loss"))
register_criterion(Criterion("rouge", lambda s: (-s.rouge, -s.accuracy, s.loss), generates=True,
                             help="ROUGE-L of greedy answers, then accuracy, then loss"))
register_criterion(Criterion("rouge-tolerant", lambda s: (-s.rouge, -s.accuracy, s.loss), generates=True, tolerance=1.0,
                             help="ROUGE-L of greedy answers, those within one example's worth of the best then "
                                  "ranked by accuracy, then loss"))
