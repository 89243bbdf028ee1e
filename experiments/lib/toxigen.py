"""The project's ToxiGen subset (`experiments/data/toxigen/`, provenance in `experiments/data/README.md`) and the
offline toxicity proxy, shared by the studies that use them.

    groups()                       # the 13 target groups with hateful and benign files
    statements("hate", "women")    # distinct statements of one file, in file order
    toxicity_scores(texts)         # alt-profanity-check probabilities [n]
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

DIR = Path(__file__).parents[1] / "data" / "toxigen"
KINDS = ("hate", "neutral")


def split_statements(line: str) -> list[str]:
    """A ToxiGen prompt line (`- a\\n- b\\n-`, literal `\\n`) -> its statements."""
    return [s.strip().lstrip("-").strip() for s in line.split("\\n") if s.strip().lstrip("-").strip()]


def lines(kind: str, group: str) -> list[str]:
    """The non-empty prompt lines of `<kind>_<group>.txt`."""
    return [l for l in (DIR / f"{kind}_{group}.txt").read_text(encoding="utf-8").splitlines() if l.strip()]


@lru_cache(maxsize=None)
def groups() -> tuple[str, ...]:
    return tuple(sorted(p.name[len("neutral_"):-len(".txt")] for p in DIR.glob("neutral_*.txt")))


def statements(kind: str, group: str) -> list[str]:
    """The distinct statements of one file (`kind` "hate" or "neutral"), in order of first appearance."""
    return list(dict.fromkeys(s for l in lines(kind, group) for s in split_statements(l)))


def toxicity_scores(texts) -> np.ndarray:
    """`alt-profanity-check` probabilities (an offline bag-of-words proxy for toxicity), `[n]`."""
    return np.asarray(profanity()(list(texts)), np.float64) if len(texts) else np.zeros(0)


def profanity():
    """The proxy's `predict_prob`, or an ImportError saying how to install it."""
    try:
        from profanity_check import predict_prob
    except ImportError as e:
        raise ImportError("the toxicity proxy alt-profanity-check is missing: "
                          "`.venv/bin/pip install alt-profanity-check==1.9.1` (in the project's test extra)") from e
    return predict_prob
