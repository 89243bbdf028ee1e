"""Entropic activation steering (EAST, Rahn et al. 2024, arXiv 2406.00244) of an LLM agent in a two-armed bandit.

    python -m experiments.east [--model NAME_OR_DIR] [--layers 10,15,20] [--betas 1,2,4] [--second-model gemma-3-270m]

The agent plays `steps` presses of a two-armed Gaussian bandit (`experiments.bandit`; sd `sigma`), the history
of (button, reward) in its prompt. Its policy is read exactly (default): the prompt ends with "Action:" and
pi(a) is the next-token probability of the two button tokens, renormalised over the two (no sampling noise, no
parse failures). The sampled mode (the paper's) is checked on a subset of prompts: M completions after
"Thought:", the action parsed from "Action: <button>", invalid completions dropped, the valid rate reported.

Episodes of every condition advance together, `chunk` rows per batched forward, each row from its own KV cache:
the prompt is `head + one piece per press + tail` (`Prompt.frame`, `Prompt.history`; the pieces tokenise as the
whole prompt, checked), the shared head is computed once, and a step runs only the newest press and the tail
(the tail's slots are overwritten by the next press). Steering acts at the last token only, so the cached
history is the unsteered computation it would be in a full pass (`tests/test_east.py` checks the policy and the
residual against a plain forward over each whole prompt).

EAST vector at each layer l of `layers`: from `n_collect` unsteered episodes, `z_t^k` = `resid_post` at the last
prompt token, `h_t^k` the policy entropy, `u = sum_k sum_t h_t^k (z_t^k - mean_t' z_t'^k) / sum h`. Steering adds
`beta * |z|_l * u / |u|` at layer l at the last prompt token (and, in sampled mode, at each generated token):
beta is in units of the layer's mean residual norm `|z|_l` (the report gives the paper's raw coefficient
`beta * |z|_l / |u|` too). Conditions -- EAST at each layer x beta; at every layer x beta the controls (a random
direction, the vector with entropies shuffled across prompts, the step-index vector `sum (tbar - t)(z - zbar)`;
each scaled to the same added norm); unsteered sampling temperatures (pi ∝ p^(1/T)) -- run on the same bandits
and reward noise (common random numbers); interventions are data (`AddVectorPerExample`: a vector and a
per-layer scale per row). Transfer: the vectors from the main prompt applied to a reworded prompt with other
button names (red / blue).

Defaults: SmolLM2-135M-Instruct, 16 collection + 16 evaluation episodes per condition x 10 steps, 40 conditions;
the report gives each phase's wall time. `--second-model gemma-3-270m` repeats the study with a base model on a
plain-text prompt.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

import models
from experiments import bandit
from experiments.common import fmt, parse_config, run_models, save_figure
from interp.interventions import AddVector, AddVectorPerExample
from models import transformer
from models.errors import InputError
from models.generate import empty_cache
from models.transformer import Capture

SITE = "resid_post"
CONTROLS = ("random", "shuffled", "step")  # same-norm control vectors, run at every swept layer


@dataclass(frozen=True)
class Config:
    model: str = "smollm2-135m-instruct"  # the agent: registered name, .gguf or HF directory
    chat: bool = True  # wrap the prompt in the model's chat template (false: plain text, for a base model)
    second_model: str = ""  # a second agent run after the first on a plain-text prompt, e.g. gemma-3-270m ("" = none)
    steps: int = 10  # presses per episode (T)
    n_collect: int = 16  # unsteered episodes whose prompts build the vectors (K)
    n_episodes: int = 16  # evaluation episodes per condition (the same bandits for every condition)
    gap: float = 5.0  # difference of the two arms' mean rewards
    sigma: float = 10.0  # reward standard deviation (the paper's 10)
    layers: tuple[int, ...] = ()  # layers the vector is built and swept at; empty: 1/3, 1/2, 2/3 of the depth
    betas: tuple[float, ...] = (0.25, 0.5, 1.0)  # steering strengths, in units of the layer's mean residual norm
    temperatures: tuple[float, ...] = (1.5, 2.0, 4.0)  # unsteered sampling temperatures compared with EAST
    window: int = 3  # final steps whose mean entropy is the "final-window entropy"
    first_k: int = 4  # the "tried both arms within the first k steps" statistic
    sampled_prompts: int = 8  # prompts (from the collection episodes) of the sampled-mode check (0: skip it)
    samples: int = 8  # completions per prompt in sampled mode (M)
    max_new_tokens: int = 32  # tokens per sampled completion
    chunk: int = 64  # sequences per vmapped chunk of the step program
    seed: int = 0  # bandits, reward noise, action draws, random direction, shuffles
    out: str = "runs"  # reports go to OUT/<experiment>/<timestamp>/


@dataclass(frozen=True)
class Prompt:
    """A wording of the bandit task: button names, intro (`{a}`, `{b}`, `{n}`), one history line per press."""

    names: tuple[str, str] = ("A", "B")
    intro: str = ("You are playing a game with two buttons, {a} and {b}. Each press gives a random reward; one "
                  "button pays more on average. Earn as much reward as possible over {n} presses. Reply in the form "
                  "'Thought: <one sentence> Action: <{a} or {b}>'.")
    line: str = "Press {i}: button {name}, reward {r}"
    empty: str = "No presses yet."

    def frame(self, m, chat: bool, n: int, prefill: str = "Action:") -> tuple[str, str]:
        """`(head, tail)`: the prompt is `head + history + tail` (chat template and intro; end of turn and `prefill`)."""
        intro = self.intro.format(a=self.names[0], b=self.names[1], n=n)
        if not chat:
            return intro, "\n\n" + prefill
        head, tail = m.apply_chat_template([{"role": "user", "content": intro + "\x00"}]).split("\x00")
        return head, tail + prefill

    def history(self, actions, rewards) -> list[str]:
        """One piece per press (rewards shown rounded to integers), each with the newline(s) before it, or the
        `empty` piece before any press. The pieces tokenise as in the whole prompt (each starts at a word)."""
        if len(actions) == 0:
            return ["\n\n" + self.empty]
        return [("\n" if i else "\n\n") + self.line.format(i=i + 1, name=self.names[int(a)], r=int(round(float(r))))
                for i, (a, r) in enumerate(zip(actions, rewards))]

    def text(self, m, chat: bool, n: int, actions, rewards, prefill: str = "Action:") -> str:
        """The prompt after `len(actions)` presses, ending in `prefill`."""
        head, tail = self.frame(m, chat, n, prefill)
        return head + "".join(self.history(actions, rewards)) + tail


REWORDED = Prompt(("red", "blue"),
                  "Two coloured buttons are in front of you, {a} and {b}. Pressing one scores points at random; one "
                  "colour scores more on average. Score as many points as you can in {n} rounds. Reply in the form "
                  "'Thought: <one sentence> Action: <{a} or {b}>'.",
                  "Round {i}: pressed {name}, got {r} points", "No rounds played yet.")


def action_ids(m, prompt: Prompt, prefill: str = "Action:") -> np.ndarray:
    """The token id of each button name right after `prefill` (each must be one token there)."""
    base = m.tokenizer.encode(prefill, add_bos=False)
    ids = []
    for name in prompt.names:
        full = m.tokenizer.encode(f"{prefill} {name}", add_bos=False)
        if full[:len(base)] != base or len(full) != len(base) + 1:
            raise InputError(f"button name {name!r} is not a single token after {prefill!r} for {m.name} "
                             f"({full[len(base):]}); choose other button names")
        ids.append(full[-1])
    return np.asarray(ids, np.int32)


def validate(cfg: Config, n_layers: int) -> tuple[int, ...]:
    """The layers to use; InputError naming the flag for any argument out of range."""
    ints = dict(steps=(cfg.steps, 2), n_collect=(cfg.n_collect, 1), n_episodes=(cfg.n_episodes, 1),
                chunk=(cfg.chunk, 1), samples=(cfg.samples, 1), max_new_tokens=(cfg.max_new_tokens, 1),
                sampled_prompts=(cfg.sampled_prompts, 0))
    for name, (v, lo) in ints.items():
        if v < lo:
            raise InputError(f"--{name.replace('_', '-')} {v}: must be >= {lo}")
    for name, v in (("window", cfg.window), ("first_k", cfg.first_k)):
        if not 1 <= v <= cfg.steps:
            raise InputError(f"--{name.replace('_', '-')} {v} out of range: valid 1..{cfg.steps} (--steps)")
    if not cfg.betas:
        raise InputError("--betas is empty: give at least one steering strength")
    if not all(np.isfinite(b) and b > 0 for b in cfg.betas):
        raise InputError(f"--betas {cfg.betas}: every strength must be finite and > 0 (0 is the unsteered run)")
    if not all(np.isfinite(t) and t > 0 for t in cfg.temperatures):
        raise InputError(f"--temperatures {cfg.temperatures}: every temperature must be finite and > 0")
    if cfg.sigma < 0 or not np.isfinite(cfg.gap):
        raise InputError(f"--sigma {cfg.sigma} / --gap {cfg.gap}: need sigma >= 0 and a finite gap")
    layers = cfg.layers or tuple(sorted({n_layers // 3, n_layers // 2, (2 * n_layers) // 3}))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise InputError(f"--layers {layers}: layer {bad[0]} out of range for a model of {n_layers} layers "
                         f"(valid 0..{n_layers - 1})")
    if len(set(layers)) != len(layers):
        raise InputError(f"--layers {layers} repeats a layer")
    return tuple(int(l) for l in layers)


class _Tokens:
    """Token ids of the prompt pieces (`Prompt.frame`, `Prompt.history`), memoised; `check` compares them with the
    tokens of the whole prompt."""

    def __init__(self, m, prompt: Prompt, chat: bool, n: int):
        self.m, self.prompt, self.chat, self.n = m, prompt, chat, n
        head, tail = prompt.frame(m, chat, n)
        self.head, self.tail = m.tokenizer.encode(head, add_bos=None), m.tokenizer.encode(tail)
        self._pieces: dict[str, list[int]] = {}

    def piece(self, text: str) -> list[int]:
        if text not in self._pieces:
            self._pieces[text] = self.m.tokenizer.encode(text)
        return self._pieces[text]

    def check(self, actions, rewards):
        """InputError unless the pieces tokenise as the whole prompt (no merge across a piece boundary)."""
        text = self.prompt.text(self.m, self.chat, self.n, actions, rewards)
        ids = self.head + sum((self.piece(h) for h in self.prompt.history(actions, rewards)), []) + self.tail
        if self.m.tokenizer.encode(text, add_bos=None) != ids:
            raise InputError(f"the prompt pieces of {self.m.name} tokenise differently from the whole prompt "
                             f"{text!r}; reword the Prompt so that each history line starts at a word")


@partial(jax.jit, static_argnames=("cfg", "layers"), donate_argnames=("cache",))
def _advance(params, cfg, cache, tokens, mask, positions, keep, vector, scale, ids, layers: tuple[int, ...]):
    """One policy step of `B` episodes from their KV cache: the new piece and the tail (`tokens [B, W]`, left-padded,
    written at `cache.index`), row b steered by `scale[b, l] * vector[b]` at each layer l at its last token.
    Returns the action logits `[B, 2]`, `resid_post` there `[len(layers), B, D]`, and the cache cut to its first
    `keep` slots (the tail is dropped: the next step's piece overwrites it)."""
    steer = AddVectorPerExample(SITE, vector, scale, positions=(-1,))
    capture = (Capture(SITE, layers=layers, seq_indices=(-1,)), Capture("final_norm", seq_indices=(-1,)))
    (_, acts), cache = transformer.forward_cached(params, cfg, tokens, mask, positions, capture, (steer,), cache=cache)
    logits = transformer.unembed(params, acts["final_norm"][:, 0], cfg)  # logits at the last token only
    slots = jnp.arange(cache.mask.shape[1])[None]
    cache = cache._replace(index=jnp.asarray(keep, jnp.int32), mask=jnp.where(slots < keep, cache.mask, 0))
    return logits[:, ids], acts[SITE][:, :, 0], cache


@partial(jax.jit, static_argnames=("cfg", "rows", "slots"))
def _head_cache(params, cfg, head, rows: int, slots: int):
    """The KV cache of the shared prompt head `[len]` (unsteered: steering is at the last token) for `rows` rows."""
    _, cache = transformer.forward_cached(params, cfg, head[None], None, None, (), (), cache=empty_cache(cfg, 1, slots))
    wide = lambda x: jnp.repeat(x, rows, axis=1 if x.ndim == 5 else 0) if x.ndim else x
    return jax.tree_util.tree_map(wide, cache)


def _round_up(n: int, k: int = 8) -> int:
    return -(-n // k) * k


def run_episodes(m, cfg: Config, prompt: Prompt, env: bandit.Bandits, vectors, scales, temps, key,
                 layers: tuple[int, ...], chat: bool) -> dict:
    """Play `E` episodes of `cfg.steps` presses under each of `N` conditions (vector `[N, D]` added with scale
    `[N, L]` at each layer, temperature `[N]`). The N x E episodes advance in chunks of `cfg.chunk` rows, one
    batched forward per step: each row keeps a KV cache of its prompt so far, and a step runs only the newest
    history line and the tail (the shared head is computed once). Returns `probs [N, E, T, 2]`, `actions`,
    `rewards [N, E, T]`, `z [N, len(layers), E, T, D]`, `texts` (the prompts of condition 0)."""
    N, E, T = vectors.shape[0], env.means.shape[0], cfg.steps
    ids = jnp.asarray(action_ids(m, prompt))
    pieces = _Tokens(m, prompt, chat, T)
    draws = np.asarray(jax.random.uniform(key, (T, E)))  # shared by the conditions (common random numbers)
    inv_t = 1.0 / np.asarray(temps, np.float32)
    means, noise = np.asarray(env.means), np.asarray(env.noise)
    R = N * E
    n_chunks = -(-R // cfg.chunk)
    B = -(-R // n_chunks)  # rows per chunk: every chunk the same shape (the last padded), one compiled program
    piece_len = max(len(pieces.piece(p)) for a in (0, 1) for p in prompt.history([a] * T, [-9999.0] * T) + prompt.history([], []))
    width = _round_up(piece_len) + len(pieces.tail)
    slots = len(pieces.head) + T * width
    actions, rewards = np.zeros((R, T), np.int32), np.zeros((R, T), np.float32)
    probs, zs = np.zeros((R, T, 2), np.float32), np.zeros((len(layers), R, T, m.cfg.d_model), np.float32)
    for c in range(n_chunks):
        rows = np.minimum(np.arange(c * B, (c + 1) * B), R - 1)  # the last chunk repeats its final row
        n_of, e_of = rows // E, rows % E
        cache = _head_cache(m.params, m.cfg, jnp.asarray(pieces.head, jnp.int32), B, slots)
        count = np.full(B, len(pieces.head))  # real tokens in each row's cache
        vec, sc = jnp.asarray(vectors[n_of]), jnp.asarray(scales[n_of])
        for t in range(T):
            if c == 0:
                pieces.check(actions[0, :t], rewards[0, :t])
            new = [pieces.piece(prompt.history(actions[r, :t], rewards[r, :t])[-1]) for r in rows]
            tok, mask = np.zeros((B, width), np.int32), np.zeros((B, width), np.int32)
            for b, piece in enumerate(new):
                seq = piece + pieces.tail
                if len(seq) > width:
                    raise InputError(f"a history piece of {len(piece)} tokens exceeds the {width - len(pieces.tail)} "
                                     f"reserved per step: {prompt.history(actions[rows[b], :t], rewards[rows[b], :t])[-1]!r}")
                tok[b, width - len(seq):], mask[b, width - len(seq):] = seq, 1
            pos = np.where(mask > 0, count[:, None] + np.cumsum(mask, 1) - 1, 0).astype(np.int32)
            keep = int(cache.index) + (width - len(pieces.tail) if t else 0)  # step 0's "no presses yet" is dropped
            logits, z, cache = _advance(m.params, m.cfg, cache, jnp.asarray(tok), jnp.asarray(mask), jnp.asarray(pos),
                                        keep, vec, sc, ids, layers)
            if t:
                count += np.asarray([len(x) for x in new])
            p = np.asarray(jax.nn.softmax(np.asarray(logits, np.float32) * inv_t[n_of, None], -1))
            a = (draws[t, e_of] < p[:, 1]).astype(np.int32)
            actions[rows, t], probs[rows, t] = a, p
            rewards[rows, t] = means[e_of, a] + env.sigma * noise[e_of, t, a]
            zs[:, rows, t] = np.asarray(z)
    texts = [[prompt.text(m, chat, T, actions[e, :t], rewards[e, :t]) for e in range(E)] for t in range(T)]
    unflat = lambda x: x.reshape(N, E, *x.shape[1:])
    return dict(probs=unflat(probs), actions=unflat(actions), rewards=unflat(rewards),
                z=zs.reshape(len(layers), N, E, T, -1).transpose(1, 0, 2, 3, 4), texts=texts)


def summarise(res: dict, env: bandit.Bandits, cfg: Config) -> list[dict]:
    """Per condition: entropy per step, final-window entropy (mean, sem over episodes), fraction trying both
    arms in the first k steps, final cumulative regret, fraction of presses on the better arm."""
    h = np.asarray(bandit.entropy(res["probs"]))  # [N, E, T]
    out = []
    for n in range(h.shape[0]):
        a = jnp.asarray(res["actions"][n])
        final = h[n, :, -cfg.window:].mean(1)
        better = np.asarray(jnp.argmax(env.means, 1))[:, None]
        out.append(dict(entropy_per_step=h[n].mean(0).tolist(), final_entropy=float(final.mean()),
                        final_entropy_sem=float(final.std(ddof=1) / np.sqrt(len(final))) if len(final) > 1 else float("nan"),
                        tried_both=float(np.mean(bandit.tried_both(a, cfg.first_k))),
                        regret=float(np.mean(bandit.regret(env, a)[:, -1])),
                        better_arm=float(np.mean(res["actions"][n] == better))))
    return out


def build_vectors(col: dict, layers, cfg: Config, L: int, D: int, key) -> dict:
    """Per swept layer: EAST, entropy-shuffled and step-index vectors and a random direction, as unit vectors,
    with `|u|` and the mean residual norm `|z|` at that layer (collection episodes: z `[len(layers), K, T, D]`)."""
    h = np.asarray(bandit.entropy(col["probs"][0]))  # [K, T]
    perm = np.random.default_rng(cfg.seed).permutation(h.size)
    h_shuf = h.reshape(-1)[perm].reshape(h.shape)
    unit = lambda v: np.asarray(v / jnp.linalg.norm(v), np.float32)
    out = {}
    for i, l in enumerate(layers):
        z = jnp.asarray(col["z"][0, i])
        u = bandit.east_vector(z, h)
        out[l] = dict(east=unit(u), shuffled=unit(bandit.east_vector(z, h_shuf)), step=unit(bandit.step_index_vector(z)),
                      random=unit(jax.random.normal(jax.random.fold_in(key, l), (D,))),
                      u_norm=float(jnp.linalg.norm(u)), z_norm=float(jnp.mean(jnp.linalg.norm(z, axis=-1))),
                      cos_step=float(np.dot(unit(u), unit(bandit.step_index_vector(z)))),
                      cos_shuffled=float(np.dot(unit(u), unit(bandit.east_vector(z, h_shuf)))))
    return out


def conditions(vecs: dict, layers, main: int, cfg: Config, L: int, D: int):
    """`(names, kinds, betas, temps, vectors [N, D], scales [N, L])` of the evaluation (each condition steers one
    layer: its scale is zero at the others)."""
    rows = [("unsteered", "unsteered", main, 0.0, 1.0, "east")]
    rows += [(f"EAST L{l} beta {b:g}", f"EAST L{l}", l, b, 1.0, "east") for l in layers for b in cfg.betas]
    rows += [(f"{k} L{l} beta {b:g}", f"{k} L{l}", l, b, 1.0, k) for l in layers for k in CONTROLS for b in cfg.betas]
    rows += [(f"temperature {t:g}", "temperature", main, 0.0, t, "east") for t in cfg.temperatures]
    vectors, scales = np.zeros((len(rows), D), np.float32), np.zeros((len(rows), L), np.float32)
    for n, (_, _, l, b, _, k) in enumerate(rows):
        vectors[n] = vecs[l][k]
        scales[n, l] = b * vecs[l]["z_norm"]
    return [r[0] for r in rows], [r[1] for r in rows], [r[3] for r in rows], [r[4] for r in rows], vectors, scales


def sampled_mode(m, cfg: Config, col: dict, vecs: dict, main: int, chat: bool, key) -> list[dict]:
    """The paper's readout on `sampled_prompts` collection prompts: `samples` completions after "Thought:" for
    unsteered (T = 1), EAST at the main layer and largest beta (T = 1, steering the last prompt token and every
    generated token) and the largest temperature; action parsed from "Action: <button>"; valid rate, entropy
    of the parsed action distribution (mean over prompts with a valid completion) and the exact-readout entropy."""
    if cfg.sampled_prompts == 0:
        return []
    flat = [t for step in col["texts"] for t in step]
    h_exact = np.asarray(bandit.entropy(col["probs"][0])).T.reshape(-1)  # step-major, as `flat`
    pick = np.random.default_rng(cfg.seed + 1).choice(len(flat), min(cfg.sampled_prompts, len(flat)), replace=False)
    prompts = [flat[i][:-len("Action:")] + "Thought:" for i in pick]
    names = Prompt().names
    pattern = re.compile(r"Action:\s*\**\s*(" + "|".join(map(re.escape, names)) + r")\b")
    b = max(cfg.betas)
    L, D = m.cfg.n_layers, m.cfg.d_model
    vec, scale = np.zeros((L, D), np.float32), np.zeros(L, np.float32)
    vec[main], scale[main] = vecs[main]["east"], b * vecs[main]["z_norm"]
    steer = AddVector(SITE, vec, scale, per_layer=True, positions=(-1,))
    runs = [("unsteered, T=1", 1.0, ()), (f"EAST L{main} beta {b:g}, T=1", 1.0, (steer,))]
    if cfg.temperatures:
        runs.append((f"unsteered, T={max(cfg.temperatures):g}", max(cfg.temperatures), ()))
    out = []
    for name, temp, iv in runs:
        seed = int(jax.random.randint(key, (), 0, 2 ** 30))
        texts = models.generate(m, [p for p in prompts for _ in range(cfg.samples)], cfg.max_new_tokens,
                                temperature=temp, seed=seed, interventions=iv)
        parsed = [pattern.search("Action:" + t if t.lstrip().startswith(names) else t) for t in texts]
        acts = np.array([-1 if p is None else names.index(p.group(1)) for p in parsed]).reshape(len(prompts), cfg.samples)
        hs = [float(bandit.entropy(np.bincount(r[r >= 0], minlength=2) / np.sum(r >= 0))) for r in acts if np.any(r >= 0)]
        out.append(dict(condition=name, valid_rate=float(np.mean(acts >= 0)), entropy=float(np.mean(hs)) if hs else float("nan"),
                        n_prompts_valid=len(hs), exact_entropy=float(h_exact[pick].mean()), example=texts[0][:160]))
    return out


def _figures(out, tag: str, names, kinds, summ, sampled, layers, main, cfg: Config):
    T = cfg.steps
    idx = {n: i for i, n in enumerate(names)}
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(range(1, T + 1), summ[0]["entropy_per_step"], "k-o", ms=3, label="unsteered")
    for b in cfg.betas:
        ax.plot(range(1, T + 1), summ[idx[f"EAST L{main} beta {b:g}"]]["entropy_per_step"], "-o", ms=3,
                label=f"EAST L{main} beta {b:g}")
    for t in cfg.temperatures:
        ax.plot(range(1, T + 1), summ[idx[f"temperature {t:g}"]]["entropy_per_step"], "--", label=f"temperature {t:g}")
    ax.axhline(np.log(2), color="grey", lw=0.5)
    ax.set(xlabel="step", ylabel="mean policy entropy (nats; max ln 2)", title=f"{tag}: entropy per step")
    ax.legend(fontsize=7)
    save_figure(fig, out / "east_entropy_per_step.png")

    n = len(layers)
    fig = Figure(figsize=(4.2 * (n + 1), 7.5))
    panels = [("final_entropy", f"L{l}", f"layer {l}: entropy, last {cfg.window} steps") for l in layers]
    panels += [("tried_both", f"L{main}", f"layer {main}: tried both arms in first {cfg.first_k}"),
               ("regret", f"L{main}", f"layer {main}: cumulative regret after {T} steps")]
    for j, (key, layer, title) in enumerate(panels):
        ax = fig.add_subplot(2, n + 1, j + 1)
        for kind in [f"{k} {layer}" for k in ("EAST", *CONTROLS)]:
            ys = [summ[0][key]] + [summ[i][key] for i, k in enumerate(kinds) if k == kind]
            ax.plot([0, *cfg.betas], ys, "-o" if kind.startswith("EAST") else ":s", ms=3, label=kind.split()[0])
        ys = [summ[0][key]] + [summ[i][key] for i, k in enumerate(kinds) if k == "temperature"]
        ax2 = ax.twiny()
        ax2.plot([1, *cfg.temperatures], ys, "k--^", ms=4, label="temperature (top axis)")
        ax2.set_xlabel("sampling temperature (black dashed)", fontsize=7)
        ax.set(xlabel="beta (x mean residual norm)", title=title)
        ax.title.set_fontsize(9)
        if j == 0:
            ax.legend(fontsize=7)
    ax = fig.add_subplot(2, n + 1, len(panels) + 1)
    if sampled:
        x = np.arange(len(sampled))
        ax.bar(x - 0.2, [s["valid_rate"] for s in sampled], 0.4, label="valid rate")
        ax.bar(x + 0.2, [s["entropy"] for s in sampled], 0.4, label="entropy of parsed actions")
        ax.set_xticks(x, [s["condition"] for s in sampled], rotation=20, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    ax.set(ylim=(0, 1))
    ax.set_title("sampled mode (entropy in nats; NaN: no valid completion)", fontsize=9)
    fig.suptitle(f"{tag}: n = {cfg.n_episodes} episodes per condition; controls scaled to EAST's added norm")
    fig.tight_layout()
    save_figure(fig, out / "east_sweep.png")


def study(m, cfg: Config, chat: bool, tag: str, out) -> tuple[list, dict]:
    """The whole study for one agent (figures into the folder `out`): report sections and metrics."""
    L, D = m.cfg.n_layers, m.cfg.d_model
    layers = validate(cfg, L)
    main = layers[len(layers) // 2]
    key = jax.random.PRNGKey(cfg.seed)
    k_col, k_env, k_act, k_dir, k_tr, k_s = jax.random.split(key, 6)
    prompt = Prompt()
    zero = (np.zeros((1, D), np.float32), np.zeros((1, L), np.float32), np.ones(1, np.float32))
    col_env = bandit.make_bandits(k_col, cfg.n_collect, cfg.steps, cfg.gap, cfg.sigma)
    clock = [("start", time.perf_counter())]
    tick = lambda name: clock.append((name, time.perf_counter()))  # noqa: E731
    col = run_episodes(m, cfg, prompt, col_env, *zero, jax.random.fold_in(k_act, 0), layers, chat)
    tick("collection")
    vecs = build_vectors(col, layers, cfg, L, D, k_dir)
    names, kinds, betas, temps, vectors, scales = conditions(vecs, layers, main, cfg, L, D)
    env = bandit.make_bandits(k_env, cfg.n_episodes, cfg.steps, cfg.gap, cfg.sigma)
    res = run_episodes(m, cfg, prompt, env, vectors, scales, np.asarray(temps, np.float32), k_act, (main,), chat)
    summ = summarise(res, env, cfg)
    tick("evaluation")
    tr_rows = [0] + [names.index(f"EAST L{main} beta {b:g}") for b in cfg.betas]
    res_tr = run_episodes(m, cfg, REWORDED, env, vectors[tr_rows], scales[tr_rows], np.ones(len(tr_rows), np.float32),
                          k_act, (main,), chat)
    transfer = summarise(res_tr, env, cfg)
    tick("transfer")
    sampled = sampled_mode(m, cfg, col, vecs, main, chat, k_s)
    tick("sampled mode")
    seconds = {name: round(t - clock[i][1], 1) for i, (name, t) in enumerate(clock[1:])}
    _figures(out, tag, names, kinds, summ, sampled, layers, main, cfg)

    h_col = np.asarray(bandit.entropy(col["probs"][0]))
    table = ("| condition | beta (x mean norm of z) | raw beta (paper's) | temperature | final-window entropy | "
             f"tried both in first {cfg.first_k} | regret | better arm |\n" + "|---" * 8 + "|\n")
    for n, name in enumerate(names):
        l = int(np.argmax(scales[n])) if scales[n].any() else main
        raw = betas[n] * vecs[l]["z_norm"] / vecs[l]["u_norm"] if kinds[n].startswith("EAST") else float("nan")
        s = summ[n]
        table += (f"| {name} | {betas[n]:g} | {fmt(raw, '.3g')} | {temps[n]:g} | {s['final_entropy']:.3f} ± {fmt(s['final_entropy_sem'], '.3f')} | "
                  f"{s['tried_both']:.2f} | {s['regret']:.1f} | {s['better_arm']:.2f} |\n")
    tr_table = "| condition (reworded prompt, red / blue) | final-window entropy | tried both | regret |\n|---|---|---|---|\n"
    tr_table += "\n".join(f"| {names[r]} | {s['final_entropy']:.3f} ± {fmt(s['final_entropy_sem'], '.3f')} | {s['tried_both']:.2f} | "
                          f"{s['regret']:.1f} |" for r, s in zip(tr_rows, transfer))
    s_table = "| sampled mode | valid rate | entropy of parsed actions | prompts with a valid completion | exact-readout entropy |\n|---|---|---|---|---|\n"
    s_table += "\n".join(f"| {s['condition']} | {s['valid_rate']:.2f} | {s['entropy']:.3f} | {s['n_prompts_valid']} | "
                         f"{s['exact_entropy']:.3f} |" for s in sampled)
    base, sem = summ[0]["final_entropy"], summ[0]["final_entropy_sem"]
    sem_of = lambda c: c["final_entropy_sem"] if np.isfinite(c["final_entropy_sem"]) else 0.0
    comparisons = []
    for l in layers:
        for b in cfg.betas:
            e = summ[names.index(f"EAST L{l} beta {b:g}")]
            ctrl = {k: summ[names.index(f"{k} L{l} beta {b:g}")] for k in CONTROLS}
            top = max(ctrl, key=lambda k: ctrl[k]["final_entropy"])
            se = float(np.hypot(sem_of(e), sem_of(ctrl[top])))
            beats = bool(e["final_entropy"] - ctrl[top]["final_entropy"] > 2 * se
                         and e["final_entropy"] - base > 2 * float(np.hypot(sem_of(e), sem_of(summ[0]))))
            comparisons.append(dict(layer=l, beta=b, east=e["final_entropy"], best_control=top,
                                    controls={k: c["final_entropy"] for k, c in ctrl.items()},
                                    best_control_entropy=ctrl[top]["final_entropy"], margin=e["final_entropy"] - ctrl[top]["final_entropy"],
                                    se=se, beats_controls=beats))
    c_table = ("| layer | beta | EAST | random | shuffled | step-index | EAST − best control (± 2 se) | EAST beats every control |\n"
               "|---|---|---|---|---|---|---|---|\n")
    c_table += "\n".join(
        f"| {c['layer']} | {c['beta']:g} | {c['east']:.3f} | "
        + " | ".join(f"{c['controls'][k]:.3f}" for k in CONTROLS)
        + f" | {c['margin']:+.3f} ± {2 * c['se']:.3f} | {'yes' if c['beats_controls'] else 'no'} |" for c in comparisons)
    wins = [c for c in comparisons if c["beats_controls"]]
    verdict = (f"Unsteered, the mean policy entropy goes from {summ[0]['entropy_per_step'][0]:.3f} at step 1 to {summ[0]['entropy_per_step'][-1]:.3f} "
               f"nats at step {cfg.steps} (max ln 2 = 0.693); final window {base:.3f} (sem {fmt(sem, '.3f')}). EAST against its "
               "same-layer, same-norm controls (final-window entropy; 'beats' = above the best control and above the "
               "unsteered run, each by more than 2 combined sem):\n\n" + c_table + "\n\n" +
               ("EAST beats every control at " + ", ".join(f"layer {c['layer']} beta {c['beta']:g}" for c in wins) + "." if wins else
                "**EAST beats its controls at no layer and strength** on this model.") +
               f" Temperatures {', '.join(f'{t:g}' for t in cfg.temperatures)} give "
               + ", ".join(f"{summ[names.index(f'temperature {t:g}')]['final_entropy']:.3f}" for t in cfg.temperatures)
               + ": in the exact readout a temperature divides the two action logits, so it flattens the policy by "
               "construction; the paper's claim that temperature fails concerns sampled chains of thought (the "
               "sampled-mode table).")
    vec_text = "\n".join(f"- layer {l}: |u| = {v['u_norm']:.3f}, mean |z| = {v['z_norm']:.2f}, cos(u, step-index vector) = "
                         f"{v['cos_step']:.3f}, cos(u, shuffled-entropy vector) = {v['cos_shuffled']:.3f}"
                         for l, v in vecs.items())
    sections = [
        (f"{tag}: setup", f"Agent {m.name} ({'chat template' if chat else 'plain-text prompt'}); two-armed bandit, arm means "
                          f"10 and {10 + cfg.gap:g} (better arm random per episode), reward sd {cfg.sigma:g}, {cfg.steps} "
                          f"presses; exact policy readout at \"Action:\". Vectors from n = {cfg.n_collect} unsteered "
                          f"episodes x {cfg.steps} steps ({cfg.n_collect * cfg.steps} prompts; Z = sum of h); evaluation "
                          f"n = {cfg.n_episodes} episodes per condition, the same bandits and reward noise for every "
                          f"condition; seed {cfg.seed}. Main layer {main}. Every steering vector (EAST and controls) is "
                          "scaled to the same added norm beta x mean |z|. Wall time (s): "
                          + ", ".join(f"{k} {v:g}" for k, v in seconds.items()) + ".\n\n" + vec_text),
        (f"{tag}: entropy vs beta vs temperature", table + "\n" + verdict + "\n\n![entropy per step](east_entropy_per_step.png)\n"
                                                   "![sweep](east_sweep.png)"),
        (f"{tag}: transfer to a reworded prompt", "The vectors from the A / B prompt, applied to a prompt with other wording "
                                                  "and buttons red / blue (same bandits):\n\n" + tr_table
                                                  + f"\n\nUnsteered {transfer[0]['final_entropy']:.3f} -> EAST L{main} beta "
                                                  f"{max(cfg.betas):g} {transfer[-1]['final_entropy']:.3f} on the reworded "
                                                  f"prompt, against {base:.3f} -> "
                                                  f"{summ[tr_rows[-1]]['final_entropy']:.3f} on the original."),
        (f"{tag}: sampled mode", (f"{min(cfg.sampled_prompts, cfg.n_collect * cfg.steps)} collection prompts x "
                                  f"{cfg.samples} completions of {cfg.max_new_tokens} tokens after \"Thought:\", action "
                                  "parsed from \"Action: <button>\", invalid completions dropped:\n\n" + s_table +
                                  "\n\nExample: " + repr(sampled[0]["example"])) if sampled else "skipped (--sampled-prompts 0)"),
    ]
    metrics = dict(layers=list(layers), main_layer=main, conditions=dict(zip(names, summ)), east_vs_controls=comparisons, seconds=seconds,
                   transfer={names[r]: s for r, s in zip(tr_rows, transfer)}, sampled=sampled,
                   vectors={str(l): {k: v[k] for k in ("u_norm", "z_norm", "cos_step", "cos_shuffled")} for l, v in vecs.items()},
                   collection_entropy_per_step=h_col.mean(0).tolist())
    return sections, metrics


def main(argv=None, cfg: Config | None = None):
    cfg = cfg or parse_config(Config, argv, __doc__)
    agents = [(cfg.model, cfg.chat)] + ([(cfg.second_model, False)] if cfg.second_model else [])
    return run_models("east", "Entropic activation steering of an LLM bandit agent (Rahn et al. 2024)", cfg,
                      [(n, lambda m, sub, n=n, chat=chat: study(m, cfg, chat, n, sub)) for n, chat in agents], "east_",
                      "second_agent")


if __name__ == "__main__":
    main()
