"""Shared pieces of the experiments: typed-config CLIs, run directories, reports, chat batches, the harmful /
harmless splits and their surface controls. The refusal metrics live in `experiments.lib.refusal_metrics` and are
re-exported here; the other helpers that are not studies are in `experiments.lib`."""

from __future__ import annotations

from typing import Sequence

import numpy as np

import models
from interp import data, stats
from interp.probes import surface_baseline, surface_baseline_split  # noqa: F401 (the studies import them here)
from interp.plot import save_figure  # noqa: F401 (the studies' one figure helper, imported here)
from models import cli
from experiments.lib.study import Report, Study, run_dir, undefined_to_none, write_report  # noqa: F401
from experiments.lib.timing import generating, lap  # noqa: F401 (the studies' phase marks)
from experiments.lib.refusal_metrics import (REFUSAL_OPENINGS, REFUSAL_SUBSTRINGS, KLFromBase,  # noqa: F401 (re-exported)
                                             RefusalScore, is_refusal, refusal_rate, refusal_token_ids)


def parse_config(cls, argv: Sequence[str] | None = None, description: str = ""):
    """A frozen dataclass `cls` filled from `--field value` flags: `models.cli.parse` (each flag's description
    from its field's `#` comment, its default, tuples as comma-separated values)."""
    return cli.parse(cls, argv, description=description)


def chat_texts(m: models.Model, prompts: Sequence[str], system: str | None = None) -> list[str]:
    """User `prompts` in the model's chat template (optional system prompt), ready for the assistant's reply."""
    msgs = lambda p: ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
    return [m.apply_chat_template(msgs(p)) for p in prompts]


def chat_batch(m: models.Model, prompts: Sequence[str], system: str | None = None):
    """Chat-formatted, left-padded `(tokens, mask)` for user `prompts` (optional system prompt)."""
    return m.tokenize(chat_texts(m, prompts, system))


def instruction_splits(seed: int, sizes: Sequence[int], source: str = "both", harmless: str = "matched",
                       normalise: bool = False) -> tuple[list[list[str]], list[list[str]]]:
    """Seeded, disjoint train/val/test splits (60/20/20, each part cut to `sizes`) of harmful instructions
    (`interp.data.harmful_instructions(source)`) and of the project's harmless instructions: `harmless="matched"`
    takes the set matched to `source` on surface form (`interp.data.matched_pairs`), any other value is a
    `harmless_instructions` style ("original" is the confounded set of the first runs). `normalise=True` strips
    trailing punctuation from every prompt on both sides (`interp.data.normalise_punctuation`)."""
    harmless_all = (data.matched_pairs(source)[1] if harmless == "matched" else data.harmless_instructions(harmless))
    out = []
    for items in (data.harmful_instructions(source), harmless_all):
        parts = data.split(items, (0.6, 0.2, 0.2), seed=seed)
        out.append([(data.normalise_punctuation(p[:n]) if normalise else p[:n]) for p, n in zip(parts, sizes)])
    return out[0], out[1]


def surface_table(named_sets: dict[str, Sequence[str]]) -> str:
    """Markdown table of the surface form of each named prompt set (`interp.data.surface_stats`)."""
    rows = []
    for name, texts in named_sets.items():
        s = data.surface_stats(texts)
        rows.append([name, s["n"], f"{s['punct_rate']:.2f}", f"{s['question_rate']:.2f}",
                     f"{s['multi_sentence_rate']:.2f}", f"{s['mean_words']:.1f}"])
    return stats.markdown_table(["set", "n", "ends in punctuation", 'ends in "?"', "multi-sentence", "mean words"], rows)


def survives(name: str, score: float, normalised: float, surface: float, surface_normalised: float,
             metric: str = "AUROC", margin: float = 0.05) -> tuple[bool, str]:
    """Whether a harmful/harmless result `score` survives its controls: it must beat the surface baseline by
    `margin` both on the matched sets and on the punctuation-normalised rerun (`normalised` vs
    `surface_normalised`). Returns `(survives, one sentence for the report)`."""
    ok = score - surface >= margin and normalised - surface_normalised >= margin
    text = (f"{name}: {metric} {score:.3f} on the matched sets (surface baseline {surface:.3f}), {normalised:.3f} with "
            f"trailing punctuation removed on both sides (surface baseline {surface_normalised:.3f}): "
            + ("**survives** (above the surface-only baseline by >= "
               f"{margin:g} in both)." if ok else
               f"**does not survive** (less than {margin:g} above the surface-only baseline in at least one: "
               "form explains it as well)."))
    return ok, text


def safe_cosine(a, b, rel_tol: float = 1e-4) -> np.ndarray:
    """Cosine of `a` and `b` along the last axis, NaN (undefined) where either vector has (numerically) zero norm:
    below `rel_tol` times the largest norm of its array, e.g. a harmful - harmless difference at layer 0 at a
    template token that is the same in every prompt."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    zero = (na <= rel_tol * na.max()) | (nb <= rel_tol * nb.max())
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.sum(a * b, -1) / (na * nb)
    return np.where(zero, np.nan, cos)


def fmt(x: float, spec: str = ".2f") -> str:
    """`x` formatted with `spec`, or "undefined" for NaN (a degenerate quantity, never reported as 0)."""
    return "undefined" if not np.isfinite(x) else format(x, spec)
