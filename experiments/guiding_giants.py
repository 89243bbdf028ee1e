"""Guiding Giants (Hegazy et al. 2025, arXiv 2505.20309): a trained controller weights refusal steering per
prompt and per layer.

    python -m experiments.guiding_giants [--model NAME_OR_DIR] [--authors-fractions 0.5,1] [--n-null 16]

The controller reads the concatenated `resid_post` of the last 4 layers at the newest token and outputs a global
scale `s` (a raw logit) and per-layer weights `w_l = sigmoid`; layer l gets `coef_l * s * w_l * d_hat`. Strengths
are fractions f of each layer's mean residual norm n_l (training prompts): `coef_l = f * n_l / mean|s w_l|`, so the
controller's mean push over the training prompts is f * n_l, and constant steering pushes f * n_l on every prompt.
Two modes: the authors' code (their `SteeringModifier`: the last layer, the newest token, the controller re-run at
every forward on the current residual; the scale computed once from the prompt is a named ablation) and the
paper's (every layer and position, the scale computed once from the prompt). Directions: the authors' phrase
direction `mean(E[refusal tokens]) - mean(E[answer tokens])` with the authors' lists (default), the lists this
study used before ("old-lists", mostly the token "I"), the Arditi difference of means. Controls at every strength:
constant, label-shuffled controller, gate-only (`max(s, 0)`: never pushes away on harmless prompts), token-push
(the unit embedding of the direction's most-pushed token, at the controller's scale), a null distribution of
`n_null` random unit directions (the controller's scale), and in paper mode the controller fine-tuned end to end
at the strength it is judged at. Refusal is judged from greedy generations (`experiments.refusal_judge`;
degenerate text counted apart); first-token refusal log-odds (with and without "I") and harmless first-token KL
are diagnostics. Test: every held-out HarmBench and StrongREJECT (never trained on) test prompt plus as many
surface-matched harmless ones. The verdict scans the controller cells of the primary direction (exact Fisher test
of harmful vs harmless refusal rate, Holm over the cells) at the `primary` cell named in the config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from experiments.common import (Report, RefusalScore, Study, chat_batch, generating, instruction_splits, lap,
                                refusal_token_ids, save_figure)
from experiments.lib.gg_controller import (PHRASE_LISTS, EndToEndSpec, StepSteer, TrainSpec, decode_rows,
                                           last_layer_logp, layer_norms, per_step_tokens, phrase_direction,
                                           prompt_pass, steer_scales, token_direction, top_pushed_token,
                                           train_controller, train_end_to_end)
from experiments.lib.refusal_judge import judge_all
from experiments.lib.refusal_select import SelectSpec, select_direction
from interp import stats
from interp.directions import cosine, normalize
from interp.interventions import AddVectorPerExample, Where
from interp.readout import Readout
from models.errors import InputError
from models.generate import generate_tokens

DIRECTIONS = ("authors", "old-lists", "arditi")
MODES = ("authors", "paper")


def _finite_positive(name: str, values, allow_zero: bool = False) -> None:
    for v in np.atleast_1d(np.asarray(values, float)):
        if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
            raise InputError(f"{name} must be finite and {'>= 0' if allow_zero else '> 0'}, got {values!r}")


@dataclass(frozen=True)
class Config:
    # data
    model: str = "smollm2-135m-instruct"  # registered name, .gguf file or Hugging Face directory
    n_train: int = 64  # per class: HarmBench train split and its surface-matched harmless set
    n_val: int = 16  # per class: validation split (Arditi direction selection only)
    n_test: int = 0  # per class and test source (HarmBench test split; StrongREJECT, never trained on); 0: all
    system_prompt: str = ""  # system message for the chat template (empty: the model's default)
    # controller (the authors' configuration)
    feature_layers: int = 4  # last layers whose resid_post at the newest token the controller reads
    hidden: int = 1024  # controller hidden width
    lr: float = 5e-5  # AdamW learning rate of the BCE controller
    epochs: int = 10  # BCE training epochs
    batch: int = 8  # BCE training batch size
    # steering
    directions: tuple[str, ...] = DIRECTIONS  # authors (phrase lists of the authors' config), old-lists, arditi
    authors_fractions: tuple[float, ...] = (0.2,)  # authors' mode: push / the last layer's mean last-token norm
    paper_fractions: tuple[float, ...] = (0.02,)  # paper's mode: push / each layer's mean residual norm
    primary: str = "authors@0.2"  # the verdict's cell: <mode>@<fraction>, controller, authors' direction
    kl_bound: float = 1.5  # nats: harmless first-token KL above this marks a cell as breaking the model
    kl_grid: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # constant-steering KL scan, both modes
    n_null: int = 16  # random-direction draws per mode and strength (the null distribution)
    null_prompts: int = 8  # prompts per class each random draw generates for (a seeded subset; 0: all)
    arditi_layer_stride: int = 6  # Arditi candidates at every k-th layer
    # end to end (paper mode)
    e2e_steps: int = 0  # end-to-end optimisation steps (jax.grad through the steered forward); 0: skip
    e2e_fraction: float = 0.02  # the paper-mode strength it is trained and judged at (one of paper_fractions)
    e2e_lr: float = 1e-3  # end-to-end Adam learning rate
    e2e_lambda: float = 1.0  # weight of KL(base || steered) on harmless prompts
    e2e_train_s: bool = False  # also train the global scale s (else only the w path)
    # evaluation
    max_new_tokens: int = 48  # greedy tokens per generation, judged as text
    batch_size: int = 64  # rows per forward / generation chunk
    alpha: float = 0.05  # family-wise level of the verdict (Holm)
    seed: int = 0  # splits, controller initialisation, random directions, label shuffle
    out: str = "runs"  # reports go to <out>/guiding_giants/<timestamp>/

    def __post_init__(self):
        for name in ("n_train", "n_val", "feature_layers", "hidden", "epochs", "batch", "n_null", "max_new_tokens",
                     "batch_size", "arditi_layer_stride"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise InputError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("n_test", "e2e_steps", "seed", "null_prompts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise InputError(f"{name} must be an integer >= 0, got {v!r}")
        if self.n_train < self.batch:
            raise InputError(f"n_train must be >= batch ({self.batch}) for one training batch, got {self.n_train}")
        for name in ("lr", "e2e_lr", "kl_bound"):
            _finite_positive(name, getattr(self, name))
        _finite_positive("e2e_lambda", self.e2e_lambda, allow_zero=True)
        if not 0 < self.alpha < 1:
            raise InputError(f"alpha must be in (0, 1), got {self.alpha!r}")
        for name in ("authors_fractions", "paper_fractions", "kl_grid"):
            if not getattr(self, name):
                raise InputError(f"{name} needs at least one strength")
            _finite_positive(name, getattr(self, name))
        bad = [d for d in self.directions if d not in DIRECTIONS]
        if bad or "authors" not in self.directions:
            raise InputError(f"directions must be among {DIRECTIONS} and include 'authors', got {self.directions!r}")
        mode, _, f = self.primary.partition("@")
        try:
            f = float(f)
        except ValueError:
            f = None
        grid = {"authors": self.authors_fractions, "paper": self.paper_fractions}
        if mode not in grid or f is None or f not in grid[mode]:
            raise InputError(f"primary must be <mode>@<fraction> with mode in {MODES} and a fraction of that mode's "
                             f"grid (authors {self.authors_fractions}, paper {self.paper_fractions}), got "
                             f"{self.primary!r}")
        if self.e2e_steps and self.e2e_fraction not in self.paper_fractions:
            raise InputError(f"e2e_fraction must be one of paper_fractions {self.paper_fractions}, got "
                             f"{self.e2e_fraction!r}")

    @property
    def primary_cell(self) -> str:
        mode, _, f = self.primary.partition("@")
        return cell_name(mode, float(f), "controller", "authors")


def cell_name(mode: str, f: float, kind: str, direction: str) -> str:
    return f"{mode} · {kind} · {direction} · f={f:g}"


# ----------------------------------------------------------------------------- generation engines


def _rows_chunks(n: int, batch: int):
    """Chunks of `batch` row indices over `n` rows, the last wrapped round to full size (one compiled shape), with
    how many of each chunk are new."""
    for lo in range(0, n, batch):
        yield np.arange(lo, lo + batch) % n, min(batch, n - lo)


def generate_static(m, tokens, mask, prompt_rows, vecs, scales, where: Where, cfg: Config) -> np.ndarray:
    """Greedy new tokens `[R, n]`: row r continues prompt `prompt_rows[r]` with `scales[r, l] * vecs[r]` added to
    `resid_post` where `where` selects (one `AddVectorPerExample` per chunk of rows)."""
    stops = jnp.asarray(m.tokenizer.stop_ids, jnp.int32)
    out = []
    for idx, keep in _rows_chunks(len(prompt_rows), cfg.batch_size):
        p = prompt_rows[idx]
        iv = AddVectorPerExample("resid_post", jnp.asarray(vecs[idx]), jnp.asarray(scales[idx]), where=where)
        with generating():
            new = generate_tokens(m, jnp.asarray(tokens[p]), jnp.asarray(mask[p]), jax.random.key(0), (iv,), stops,
                                  max_new_tokens=cfg.max_new_tokens)
            out.append(np.asarray(new)[:keep])
    return np.concatenate(out)


def generate_per_step(m, tokens, mask, prompt_rows, vecs, ctrl, coef, bias, gate, cfg: Config):
    """Greedy new tokens `[R, n]` and the scale at each step `[R, n]` with the controller re-run at every forward
    (`gg_controller.per_step_tokens`); per row: its prompt, direction, `coef`, `bias`, `gate`."""
    L = m.cfg.n_layers
    layers = tuple(range(L - cfg.feature_layers, L))
    stops = jnp.asarray(m.tokenizer.stop_ids, jnp.int32)
    out, sc = [], []
    for idx, keep in _rows_chunks(len(prompt_rows), cfg.batch_size):
        p = prompt_rows[idx]
        f = lambda a: jnp.asarray(a[idx], jnp.float32)
        with generating():
            new, s = per_step_tokens(m, jnp.asarray(tokens[p]), jnp.asarray(mask[p]),
                                     StepSteer(ctrl, f(coef), f(bias), f(gate)), f(vecs), stops, layers=layers,
                                     max_new_tokens=cfg.max_new_tokens)
            out.append(np.asarray(new)[:keep])
            sc.append(np.asarray(s)[:keep])
    return np.concatenate(out), np.concatenate(sc)


# ----------------------------------------------------------------------------- per-cell measures


def _first_token(logp, base_logp, is_safe, ids_all, ids_no_i) -> dict:
    """First-token diagnostics per row: KL(base || steered) on the harmless rows (`is_safe`), refusal log-odds with
    and without "I" on every row."""
    logp, base = jnp.asarray(logp), jnp.asarray(base_logp)[is_safe]
    kl = np.asarray(jnp.sum(jnp.exp(base) * (base - logp[is_safe]), -1))
    lo = lambda ids: np.asarray(jax.vmap(lambda row: RefusalScore(ids)(Readout(row[None, None], None)))(logp))
    return dict(kl=kl, logodds=lo(ids_all), logodds_no_i=lo(ids_no_i))


def _cell_stats(labels: list[str], harm: np.ndarray, safe: np.ndarray) -> dict:
    lab = np.asarray(labels)
    k = lambda rows, what: int(np.sum(lab[rows] == what))
    n_h, n_s = len(harm), len(safe)
    sel = stats.rate_difference(k(harm, "refusal"), n_h, k(safe, "refusal"), n_s)
    p1 = stats.fisher_exact(k(harm, "refusal"), n_h, k(safe, "refusal"), n_s, alternative="greater")
    return dict(refused_harmful=k(harm, "refusal"), refused_harmless=k(safe, "refusal"),
                degenerate_harmful=k(harm, "degenerate"), degenerate_harmless=k(safe, "degenerate"), n_harmful=n_h,
                n_harmless=n_s, selectivity=dataclasses.replace(sel, p=p1, method=sel.method + "; Fisher one-sided"))


def _fmt_rate(k: int, n: int) -> str:
    w = stats.wilson(k, n)
    return f"{k}/{n} [{w.lo:.2f}, {w.hi:.2f}]"


# ----------------------------------------------------------------------------- the study


def study(m, cfg: Config, out) -> Report:
    """The whole study on model `m` (figures, controller checkpoints and generations into the folder `out`)."""
    L, D = m.cfg.n_layers, m.cfg.d_model
    if cfg.feature_layers > L:
        raise InputError(f"feature_layers must be in [1, {L}] for this model, got {cfg.feature_layers}")
    ids_all = jnp.asarray(refusal_token_ids(m))
    i_tok = m.tokenizer.encode("I", add_bos=False)
    ids_no_i = jnp.asarray([i for i in refusal_token_ids(m) if [i] != i_tok])
    system = cfg.system_prompt or None
    # data: every held-out test prompt of both sources (or n_test), as many matched harmless ones per source
    big = 10 ** 6
    n_test = cfg.n_test or big
    hb_harm, hb_safe = instruction_splits(cfg.seed, (cfg.n_train, cfg.n_val, n_test), source="harmbench")
    sr_harm, sr_safe = instruction_splits(cfg.seed, (0, 0, n_test), source="strongreject")
    hb_n, sr_n = min(len(hb_harm[2]), len(hb_safe[2])), min(len(sr_harm[2]), len(sr_safe[2]))
    harm_texts = hb_harm[2][:hb_n] + sr_harm[2][:sr_n]
    safe_texts = hb_safe[2][:hb_n] + sr_safe[2][:sr_n]
    N = len(harm_texts) + len(safe_texts)
    harm, safe = np.arange(len(harm_texts)), np.arange(len(harm_texts), N)
    everyone = np.arange(N)
    source = np.array(["harmbench"] * hb_n + ["strongreject"] * sr_n)
    source = np.r_[source, source]
    tokens, mask = chat_batch(m, harm_texts + safe_texts, system)
    train_tm = chat_batch(m, hb_harm[0] + hb_safe[0], system)
    y = np.r_[np.ones(len(hb_harm[0])), np.zeros(len(hb_safe[0]))]
    x_tr, logp_tr = prompt_pass(m, *train_tm, cfg.feature_layers, cfg.batch_size)
    x_te, base_logp = prompt_pass(m, tokens, mask, cfg.feature_layers, cfg.batch_size)
    base_logp = jnp.asarray(base_logp)
    last_resid = x_te[:, -D:]
    norm_all, norm_last = layer_norms(m, *train_tm, cfg.batch_size)
    lap("inputs")
    # controllers
    spec = TrainSpec(n_hidden=cfg.hidden, lr=cfg.lr, batch=cfg.batch, epochs=cfg.epochs)
    k_bce, k_shuffle, k_rand = jax.random.split(jax.random.key(cfg.seed), 3)
    ctrl, bce_curve = train_controller(x_tr, y, L, spec, k_bce, out / "checkpoints" / "bce")
    y_shuffled = np.random.default_rng(cfg.seed).permutation(y)
    shuffled, _ = train_controller(x_tr, y_shuffled, L, spec, k_shuffle, out / "checkpoints" / "label_shuffled")
    outs = {name: tuple(np.asarray(v) for v in c(jnp.asarray(x))) for name, c in
            (("controller", ctrl), ("label-shuffled", shuffled)) for x in [x_te]}
    train_sw = {name: np.mean(np.abs(np.asarray(steer_scales(*c(jnp.asarray(x_tr)), 1.0))), 0)
                for name, c in (("controller", ctrl), ("label-shuffled", shuffled))}  # mean |s w_l| [L]
    # directions
    dirs, notes = {}, {}
    for name in cfg.directions:
        if name in PHRASE_LISTS:
            dirs[name] = np.asarray(phrase_direction(m, *PHRASE_LISTS[name]))
    if "arditi" in cfg.directions:
        select = SelectSpec(system_prompt=cfg.system_prompt, layer_stride=cfg.arditi_layer_stride,
                            sweep_batch=cfg.batch_size)
        sel = select_direction(m, select, hb_harm, hb_safe, RefusalScore(ids_no_i))
        dirs["arditi"] = np.asarray(normalize(sel["direction"]))
        notes["arditi"] = dict(layer=int(sel["layer"]), position=int(sel["position"]), n_pass=int(sel["n_pass"]),
                               relaxed=bool(sel["relaxed"]))
    top = {name: top_pushed_token(m, d) for name, d in dirs.items()}
    token_dirs = {name: np.asarray(token_direction(m, t)) for name, t in top.items()}
    rand = np.asarray(normalize(jax.random.normal(k_rand, (cfg.n_null, D))))
    i_dir = np.asarray(token_direction(m, i_tok[0])) if len(i_tok) == 1 else None
    lap("controllers and directions")
    # where each mode breaks: harmless first-token KL of constant steering along the authors' direction
    kl_scan = {"authors": [], "paper": [], "authors controller": [], "authors controller log-odds": []}
    d = jnp.asarray(dirs["authors"])
    s0, w0 = (np.asarray(v) for v in ctrl(jnp.asarray(x_te)))
    for f in cfg.kl_grid:
        lp = last_layer_logp(m, last_resid[safe], np.full(len(safe), f * norm_last[-1]), d)
        kl_scan["authors"].append(float(jnp.mean(jnp.sum(jnp.exp(base_logp[safe]) * (base_logp[safe] - lp), -1))))
        c = f * norm_last[-1] / train_sw["controller"][-1] * s0 * w0[:, -1]
        fi = _first_token(last_layer_logp(m, last_resid, c, d), base_logp, everyone >= len(harm), ids_all, ids_no_i)
        kl_scan["authors controller"].append(float(fi["kl"].mean()))
        kl_scan["authors controller log-odds"].append(
            (float(fi["logodds_no_i"][harm].mean()), float(fi["logodds_no_i"][safe].mean())))
        sc = np.broadcast_to(f * norm_all, (len(safe), L))
        _, lp = prompt_pass(m, tokens[safe], mask[safe], cfg.feature_layers, cfg.batch_size,
                            lambda r, sc=sc: (AddVectorPerExample("resid_post", d, jnp.asarray(sc[r])),))
        kl_scan["paper"].append(float(jnp.mean(jnp.sum(jnp.exp(base_logp[safe]) * (base_logp[safe] - lp), -1))))
    lap("KL scan")

    # ------------------------------------------------------------------ cells
    cells, texts, first = {}, {}, {}
    s_c, w_c = outs["controller"]
    s_sh, w_sh = outs["label-shuffled"]

    def paper_scale(f, kind, s=None, w=None):
        coef = f * norm_all / train_sw["label-shuffled" if kind == "label-shuffled" else "controller"]
        if kind == "constant":
            return np.broadcast_to(f * norm_all, (N, L))
        if kind == "gate-only":
            s = np.maximum(s, 0.0)
        return np.asarray(steer_scales(jnp.asarray(s), jnp.asarray(w), coef))

    # paper mode: every layer and position, the scale from the prompt once
    e2e_curve = None
    if cfg.e2e_steps:
        coef = cfg.e2e_fraction * norm_all / train_sw["controller"]
        e2e_spec = EndToEndSpec(steps=cfg.e2e_steps, batch=cfg.batch, lr=cfg.e2e_lr, lam=cfg.e2e_lambda,
                                train_s=cfg.e2e_train_s)
        e2e, e2e_curve = train_end_to_end(m, ctrl, dirs["authors"], x_tr, *train_tm, y > 0, logp_tr, ids_no_i,
                                          e2e_spec, spec, cfg.seed, coef,
                                          checkpoints=out / "checkpoints" / "end_to_end_authors")
        s_e, w_e = (np.asarray(v) for v in e2e(jnp.asarray(x_te)))
        if not cfg.e2e_train_s:
            s_e = s_c  # the copy's own s drifted with its body; it steers with the BCE controller's
    lap("end to end")
    rng = np.random.default_rng(cfg.seed + 1)
    n_sub = cfg.null_prompts or N
    null_idx = [np.r_[np.sort(rng.permutation(harm)[:n_sub]), np.sort(rng.permutation(safe)[:n_sub])]
                for _ in range(cfg.n_null)]  # each draw's prompts: a seeded subset per class (all: null_prompts=0)
    pidx = {}
    paper_rows = []  # (cell, vec [D], scale [N, L]): every layer and position, the scale from the prompt once
    for f in cfg.paper_fractions:
        d = dirs["authors"]
        paper_rows += [(cell_name("paper", f, "controller", "authors"), d, paper_scale(f, "controller", s_c, w_c)),
                       (cell_name("paper", f, "token-push", "authors"), token_dirs["authors"],
                        paper_scale(f, "controller", s_c, w_c)),
                       (cell_name("paper", f, "constant", "authors"), d, paper_scale(f, "constant")),
                       (cell_name("paper", f, "label-shuffled", "authors"), d,
                        paper_scale(f, "label-shuffled", s_sh, w_sh)),
                       (cell_name("paper", f, "gate-only", "authors"), d, paper_scale(f, "gate-only", s_c, w_c))]
        if cfg.e2e_steps and f == cfg.e2e_fraction:
            paper_rows.append((cell_name("paper", f, "end-to-end", "authors"), d,
                               paper_scale(f, "controller", s_e, w_e)))
        for k in range(cfg.n_null):
            name = cell_name("paper", f, f"random #{k}", "random")
            pidx[name] = null_idx[k]
            paper_rows.append((name, rand[k], paper_scale(f, "controller", s_c, w_c)))
    rows_of = lambda name: pidx.setdefault(name, everyone)
    prompt_rows = np.concatenate([rows_of(n) for n, _, _ in paper_rows])
    vecs = np.concatenate([np.broadcast_to(v, (len(rows_of(n)), D)) for n, v, _ in paper_rows])
    scales = np.concatenate([sc[rows_of(n)] for n, _, sc in paper_rows])
    new = generate_static(m, tokens, mask, prompt_rows, vecs, scales, Where(), cfg)
    lo = 0
    for name, v, sc in paper_rows:
        r = rows_of(name)
        texts[name] = decode_rows(m, new[lo:lo + len(r)], m.tokenizer.stop_ids)
        lo += len(r)
        steer = lambda q, v=v, sc=sc[r]: (AddVectorPerExample("resid_post", jnp.asarray(v), jnp.asarray(sc[q])),)
        _, lp = prompt_pass(m, tokens[r], mask[r], cfg.feature_layers, cfg.batch_size, steer)
        first[name] = _first_token(lp, base_logp[r], r >= len(harm), ids_all, ids_no_i)
    lap("paper mode")

    # authors' mode: last layer, newest token, the controller re-run at every step (once-per-prompt: an ablation)
    zero, ones = np.zeros(N), np.ones(N)
    step_rows = {"controller": [], "label-shuffled": []}  # per controller: (cell, vec, coef, bias, gate), each [N]
    for f in cfg.authors_fractions:
        cf = {k: f * norm_last[-1] / train_sw[k][-1] for k in train_sw}
        for dname, d in dirs.items():
            step_rows["controller"].append((cell_name("authors", f, "controller", dname), d, cf["controller"] * ones,
                                            zero, zero))
            if dname in PHRASE_LISTS:
                step_rows["controller"].append((cell_name("authors", f, "token-push", dname), token_dirs[dname],
                                                cf["controller"] * ones, zero, zero))
        d = dirs["authors"]
        step_rows["controller"] += [
            (cell_name("authors", f, "once-per-prompt", "authors"), d, zero, cf["controller"] * s_c * w_c[:, -1], zero),
            (cell_name("authors", f, "constant", "authors"), d, zero, f * norm_last[-1] * ones, zero),
            (cell_name("authors", f, "gate-only", "authors"), d, cf["controller"] * ones, zero, ones)]
        step_rows["label-shuffled"].append((cell_name("authors", f, "label-shuffled", "authors"), d,
                                            cf["label-shuffled"] * ones, zero, zero))
        for k in range(cfg.n_null):
            name = cell_name("authors", f, f"random #{k}", "random")
            pidx[name] = null_idx[k]
            step_rows["controller"].append((name, rand[k], cf["controller"] * ones, zero, zero))
    for cname, rows in step_rows.items():
        c = ctrl if cname == "controller" else shuffled
        prompt_rows = np.concatenate([rows_of(r[0]) for r in rows])
        cat = lambda j: np.concatenate([r[j][rows_of(r[0])] for r in rows])
        vecs = np.concatenate([np.broadcast_to(r[1], (len(rows_of(r[0])), D)) for r in rows])
        new, sc = generate_per_step(m, tokens, mask, prompt_rows, vecs, c, cat(2), cat(3), cat(4), cfg)
        lo = 0
        for name, v, *_ in rows:
            r = rows_of(name)
            texts[name] = decode_rows(m, new[lo:lo + len(r)], m.tokenizer.stop_ids)
            lp = last_layer_logp(m, last_resid[r], sc[lo:lo + len(r), 0], jnp.asarray(v))
            first[name] = _first_token(lp, base_logp[r], r >= len(harm), ids_all, ids_no_i)
            lo += len(r)
    lap("authors mode")
    base_new = generate_static(m, tokens, mask, everyone, np.zeros((N, D)), np.zeros((N, L)), Where(), cfg)
    texts["none"] = decode_rows(m, base_new, m.tokenizer.stop_ids)
    first["none"] = _first_token(base_logp, base_logp, everyone >= len(harm), ids_all, ids_no_i)
    rows_of("none")
    lap("unsteered")

    # ------------------------------------------------------------------ judging and statistics
    labels = {name: judge_all(t) for name, t in texts.items()}
    for name in texts:
        r = pidx[name]
        st = _cell_stats(labels[name], np.flatnonzero(r < len(harm)), np.flatnonzero(r >= len(harm)))
        fi = first[name]
        is_h = r < len(harm)
        mode, kind, dname, f = (("none", "no steering", "-", 0.0) if name == "none" else
                                (lambda p: (p[0], p[1], p[2], float(p[3][2:])))(name.split(" · ")))
        cells[name] = dict(mode=mode, kind=kind, direction=dname, fraction=f, **st,
                           kl_harmless=float(fi["kl"].mean()), kl_harmless_max=float(fi["kl"].max()),
                           logodds_harmful=float(fi["logodds"][is_h].mean()),
                           logodds_harmless=float(fi["logodds"][~is_h].mean()),
                           logodds_no_i_harmful=float(fi["logodds_no_i"][is_h].mean()),
                           logodds_no_i_harmless=float(fi["logodds_no_i"][~is_h].mean()),
                           within_bound=bool(fi["kl"].mean() <= cfg.kl_bound))
    refused = {name: np.asarray(lab) == "refusal" for name, lab in labels.items()}
    grid = {"authors": cfg.authors_fractions, "paper": cfg.paper_fractions}
    scanned = {cell_name(mo, f, "controller", "authors"): cells[cell_name(mo, f, "controller", "authors")]["selectivity"]
               for mo in MODES for f in grid[mo]}
    verdict = stats.verdict(scanned, cfg.primary_cell, alpha=cfg.alpha, alternative="greater",
                            what="refusal rate on harmful minus harmless test prompts (controller, authors' direction)")
    nulls, versus = {}, {}
    for mo in MODES:
        for f in grid[mo]:
            c_name = cell_name(mo, f, "controller", "authors")
            null = [cells[cell_name(mo, f, f"random #{k}", "random")]["selectivity"].value for k in range(cfg.n_null)]
            nulls[c_name] = stats.null_test(cells[c_name]["selectivity"].value, null, "greater", label=c_name)
            for kind in ("constant", "label-shuffled", "gate-only", "token-push", "once-per-prompt", "end-to-end"):
                o = cell_name(mo, f, kind, "authors")
                if o in cells:  # per prompt: controller refused minus control refused; harmful minus harmless
                    a = refused[c_name].astype(float) - refused[o]
                    versus[(c_name, kind)] = stats.mean_difference(a[harm], a[safe], seed=cfg.seed,
                                                                   label=f"{c_name} vs {kind}")
    score = lambda s, src: np.r_[s[harm][source[harm] == src], s[safe][source[safe] == src]]
    yy = lambda src: np.r_[np.ones(np.sum(source[harm] == src)), np.zeros(np.sum(source[safe] == src))]
    aurocs = {}
    for name, (s, _) in outs.items():
        for src in ("harmbench", "strongreject"):
            aurocs[(name, src)] = stats.auroc(score(s, src), yy(src), seed=cfg.seed, label=f"{name} {src}")

    # ------------------------------------------------------------------ report
    _figure(out, cfg, cells)
    prim = cells[cfg.primary_cell]
    claims = [
        stats.Claim("The controller detects harm on held-out prompts (AUROC of s > 0.5, HarmBench and StrongREJECT)",
                    "; ".join(f"{src}: {aurocs[('controller', src)]}" for src in ("harmbench", "strongreject")),
                    all(aurocs[("controller", src)].lo > 0.5 for src in ("harmbench", "strongreject"))),
        stats.Claim(f"Controller steering refuses harmful more than harmless prompts (primary: {cfg.primary_cell})",
                    f"{prim['selectivity']}; Holm p {verdict.p_holm[cfg.primary_cell]:.3g}", verdict.holds),
        stats.Claim("... more selectively than the random-direction null (primary cell)", str(nulls[cfg.primary_cell]),
                    bool(nulls[cfg.primary_cell].p < cfg.alpha and
                         nulls[cfg.primary_cell].observed > nulls[cfg.primary_cell].band[1])),
    ]
    for (c_name, kind), e in versus.items():
        if c_name == cfg.primary_cell:
            claims.append(stats.Claim(f"... more selectively than {kind} (primary cell; selectivity difference)",
                                      str(e), bool(e.p < cfg.alpha and e.lo > 0)))
    if i_dir is not None and "old-lists" in dirs:
        claims.append(stats.Claim(
            'The old phrase lists make a direction that is mostly the token "I" (the authors\' lists do not)',
            f'cosine with E["I"]: old lists {float(cosine(dirs["old-lists"], i_dir)):+.2f}, authors\' '
            f'{float(cosine(dirs["authors"], i_dir)):+.2f}; top pushed token: old lists '
            f'{m.decode([top["old-lists"]])!r}, authors\' {m.decode([top["authors"]])!r}', None))
    broken = {mo: [f for f in grid[mo] if not cells[cell_name(mo, f, "constant", "authors")]["within_bound"]]
              for mo in MODES}
    table = _results_table(cells, cfg)
    sections = [
        ("Data", f"Training: {len(hb_harm[0])} + {len(hb_safe[0])} prompts (HarmBench train split and its surface-"
                 f"matched harmless set); validation {len(hb_harm[1])} + {len(hb_safe[1])} (Arditi selection). Test: "
                 f"{len(harm)} harmful (HarmBench test {hb_n}, StrongREJECT {sr_n}, never trained on) and "
                 f"{len(safe)} surface-matched harmless prompts, seed {cfg.seed}. Greedy generations of "
                 f"{cfg.max_new_tokens} new tokens judged by `experiments.refusal_judge` (refusal phrases in the first "
                 "200 characters; degenerate text — no words, repetition — counted apart, never as refusal)."),
        ("Strengths", "Fractions of each layer's mean `resid_post` norm on the training prompts (all tokens after "
                      "the first for the paper's mode; the last token for the authors' mode). Per-layer mean norm: "
                      + ", ".join(f"{v:.0f}" for v in norm_all) + f"; last layer at the last token "
                      f"{norm_last[-1]:.1f}. Controller scale normaliser mean|s·w_l| on training prompts: "
                      f"{train_sw['controller'].mean():.2f} (label-shuffled {train_sw['label-shuffled'].mean():.2f}). "
                      f"Cells whose constant steering takes harmless first-token KL above {cfg.kl_bound:g} nats: "
                      f"authors' mode {broken['authors'] or 'none'}, paper's mode {broken['paper'] or 'none'}."),
        ("Where each mode breaks", "Harmless first-token KL (nats) of constant steering along the authors' "
                                   "direction, by strength f:\n\n" + stats.markdown_table(
                                       ["mode"] + [f"f={f:g}" for f in cfg.kl_grid],
                                       [[f"{mo}, constant"] + [f"{v:.3f}" for v in kl_scan[mo]] for mo in MODES] +
                                       [["authors, controller"] + [f"{v:.3f}" for v in kl_scan["authors controller"]],
                                        ["authors, controller: refusal log-odds without \"I\", harmful / harmless"]
                                        + [f"{a:+.2f} / {b:+.2f}" for a, b in kl_scan["authors controller log-odds"]]])
                                   + "\n\n(The authors' mode is exact from the cached last residual; the paper's "
                                   "takes a steered prompt pass. Generations are judged at the strengths of the "
                                   "results table only.)"),
        ("Controller", f"BCE loss per epoch: {', '.join(f'{v:.3f}' for v in bce_curve)}. s on test prompts: harmful "
                       f"mean {s_c[harm].mean():+.2f}, harmless {s_c[safe].mean():+.2f}. AUROC of s (bootstrap 95%): "
                       + "; ".join(f"{n} {src} {e}" for (n, src), e in aurocs.items()) +
                       (f". End to end (paper mode, f={cfg.e2e_fraction:g}, objective −refusal log-odds without "
                        f"\"I\" + {cfg.e2e_lambda:g}·KL): {e2e_curve[0]:.3f} → {e2e_curve[-1]:.3f}"
                        if e2e_curve else "")),
        ("Directions", "Unit directions; cosines: " + ", ".join(
            f"{a}/{b} {float(cosine(dirs[a], dirs[b])):+.3f}" for i, a in enumerate(dirs) for b in list(dirs)[i + 1:])
            + ". Most-pushed token (token-push control): " + ", ".join(f"{n} {m.decode([t])!r}" for n, t in top.items())
            + (f". Arditi: layer {notes['arditi']['layer']}, position {notes['arditi']['position']}, "
               f"{notes['arditi']['n_pass']} candidates pass{' (relaxed)' if notes['arditi']['relaxed'] else ''}"
               if "arditi" in notes else "") + f". Random null: {cfg.n_null} unit Gaussian directions per cell."),
        ("Results", table + "\n\n![selectivity](selectivity.png)"),
        ("Verdict", verdict.sentence + "\n\n" + verdict.table),
        ("Controls at every scanned cell", _controls_table(nulls, versus)),
        ("Claims", stats.claims_section(claims)),
        ("Sample generations", "\n".join(
            f"- **{name}**: harmful: {texts[name][0][:100]!r}; harmless: {texts[name][safe[0]][:100]!r}"
            for name in texts if "random #" not in name)),
    ]
    metrics = dict(
        n=dict(harmful=len(harm), harmless=len(safe), harmbench=hb_n, strongreject=sr_n),
        bce_loss=bce_curve, end_to_end_objective=e2e_curve, kl_scan=kl_scan,
        norms=dict(all_tokens=norm_all.tolist(), last_token=norm_last.tolist()),
        top_token={k: m.decode([v]) for k, v in top.items()},
        auroc={f"{n} {src}": dataclasses.asdict(e) for (n, src), e in aurocs.items()},
        cells={k: {**{a: b for a, b in v.items() if a != "selectivity"}, "selectivity": dataclasses.asdict(
            v["selectivity"])} for k, v in cells.items()},
        verdict=dict(primary=cfg.primary_cell, holds=verdict.holds, sentence=verdict.sentence,
                     holm=verdict.p_holm),
        nulls={k: dict(observed=t.observed, p=t.p, band=list(t.band), percentile=t.percentile)
               for k, t in nulls.items()},
        versus={f"{a} vs {b}": dataclasses.asdict(e) for (a, b), e in versus.items()},
        claims=[dataclasses.asdict(c) for c in claims])
    (out / "generations.json").write_text(json.dumps(texts))
    return Report(sections, metrics)


STUDY = Study("guiding_giants", "Guiding Giants: a trained steering controller (Hegazy et al. 2025)", Config, study,
              __doc__)


def main(argv=None, cfg: Config | None = None):
    """`python -m experiments.guiding_giants`: the run folder and its metrics."""
    return STUDY.main(argv, cfg)


def _results_table(cells: dict, cfg: Config) -> str:
    rows = []
    for name, c in cells.items():
        if "random #" in name:
            continue
        rows.append([name, _fmt_rate(c["refused_harmful"], c["n_harmful"]),
                     _fmt_rate(c["refused_harmless"], c["n_harmless"]), str(c["selectivity"]),
                     f"{c['degenerate_harmful']}/{c['n_harmful']}", f"{c['degenerate_harmless']}/{c['n_harmless']}",
                     f"{c['kl_harmless']:.3f}" + ("" if c["within_bound"] else " (over bound)"),
                     f"{c['logodds_no_i_harmful']:+.2f} / {c['logodds_no_i_harmless']:+.2f}",
                     f"{c['logodds_harmful']:+.2f} / {c['logodds_harmless']:+.2f}"])
    return stats.markdown_table(
        ["cell", "refused harmful [Wilson 95%]", "refused harmless", "selectivity (rate diff, Newcombe, Fisher p)",
         "degenerate harmful", "degenerate harmless", f"harmless KL (bound {cfg.kl_bound:g})",
         "first-token log-odds without \"I\" (harmful / harmless)", "with \"I\""], rows)


def _controls_table(nulls: dict, versus: dict) -> str:
    rows = [[k, "random-direction null", str(t)] for k, t in nulls.items()]
    rows += [[a, f"minus {b} (per-prompt difference, harmful minus harmless)", str(e)] for (a, b), e in versus.items()]
    return stats.markdown_table(["controller cell", "control", "statistic"], rows)


def _figure(out, cfg: Config, cells: dict) -> None:
    kinds = ("controller", "gate-only", "constant", "label-shuffled", "token-push", "once-per-prompt", "end-to-end")
    fig = Figure(figsize=(12, 7))
    for j, mode in enumerate(MODES):
        fr = cfg.authors_fractions if mode == "authors" else cfg.paper_fractions
        ax, bx = fig.add_subplot(2, 2, 1 + j), fig.add_subplot(2, 2, 3 + j)
        for kind in kinds:
            pts = [cells.get(cell_name(mode, f, kind, "authors")) for f in fr]
            xs = [f for f, p in zip(fr, pts) if p]
            pts = [p for p in pts if p]
            if not pts:
                continue
            sel = [p["selectivity"] for p in pts]
            ax.errorbar(xs, [e.value for e in sel], yerr=[[e.value - e.lo for e in sel], [e.hi - e.value for e in sel]],
                        fmt="-o", capsize=3, label=kind)
            bx.plot(xs, [p["kl_harmless"] for p in pts], "-o", label=kind)
        null = [[cells[cell_name(mode, f, f"random #{k}", "random")]["selectivity"].value for k in range(cfg.n_null)]
                for f in fr]
        ax.fill_between(fr, [np.percentile(v, 5) for v in null], [np.percentile(v, 95) for v in null], color="grey",
                        alpha=0.3, label="random null 5-95%")
        ax.axhline(0, color="k", lw=0.5)
        ax.set(xscale="log", xlabel="strength f (fraction of the layer's residual norm)",
               ylabel="refusal rate harmful − harmless", title=f"{mode} mode, authors' direction")
        bx.axhline(cfg.kl_bound, color="r", ls=":", label="KL bound")
        bx.set(xscale="log", yscale="symlog", xlabel="strength f", ylabel="harmless first-token KL (nats)")
        if j == 0:
            ax.legend(fontsize=7)
            bx.legend(fontsize=7)
    save_figure(fig, out / "selectivity.png")


if __name__ == "__main__":
    main()
