"""Entropic activation steering (EAST, Rahn et al. 2024, arXiv 2406.00244) of an LLM agent in a two-armed bandit.

    python -m experiments.east [--model NAME_OR_DIR] [--layers 10,15,20] [--betas 1,2,4] [--second-model gemma-3-270m]

The agent plays `steps` presses of a two-armed Gaussian bandit (`experiments.bandit`; sd `sigma`), the history
of (button, reward) in its prompt. Its policy is read exactly (default): the prompt ends with "Action:" and
pi(a) is the next-token probability of the two button tokens, renormalised over the two (no sampling noise, no
parse failures). The sampled mode (the paper's) is checked on a subset of prompts: M completions after
"Thought:", the action read by `parse_action` (the first explicit "Action: <button>"; else a leading button name
that stands alone), invalid completions dropped, the valid rate reported.

Episodes of every condition advance together, `chunk` rows per batched forward, each row from its own KV cache:
the prompt is `head + one piece per press + tail` (`Prompt.frame`, `Prompt.history`; the pieces tokenise as the
whole prompt, checked), the shared head is computed once, and a step runs only the newest press and the tail
(the tail's slots are overwritten by the next press). Steering acts at the last token only, so the cached
history is the unsteered computation it would be in a full pass (`tests/experiments/test_east.py` checks the policy and the
residual against a plain forward over each whole prompt).

EAST vector at each layer l of `layers`: from `n_collect` unsteered episodes, `z_t^k` = `resid_post` at the last
prompt token, `h_t^k` the policy entropy, `u = sum_k sum_t h_t^k (z_t^k - mean_t' z_t'^k) / sum h`. Steering adds
`beta * |z|_l * u / |u|` at layer l at the last prompt token (and, in sampled mode, at each generated token):
beta is in units of the layer's mean residual norm `|z|_l` (the report gives the paper's raw coefficient
`beta * |z|_l / |u|` too). Conditions -- EAST at each layer x beta; at every layer x beta the controls (a random
direction, the vector with entropies shuffled across prompts, the step-index vector `sum (tbar - t)(z - zbar)`;
each scaled to the same added norm); unsteered sampling temperatures (pi ∝ p^(1/T)) -- run on the same bandits,
reward noise and action draws (common random numbers); interventions are data (`AddVectorPerExample`: a vector
and a per-layer scale per row). The null: `n_null` further random directions of the same norm at every layer x
beta, each on the first `null_episodes` bandits, batched with the other conditions (`Group`). Transfer: the
vectors from the main prompt applied to a reworded prompt with other button names (red / blue).

Statistics (`interp.stats`): the unit is the episode (final-window entropy); EAST against a control or the
unsteered run is the paired per-episode difference (bootstrap interval, sign-flip p); EAST against the null is
its percentile among the null draws on the same episodes. The verdict is computed from `primary` (EAST minus its
best same-layer control at one layer x beta, named before the run), Holm-corrected over every layer x beta cell;
the report ends with the Claims the README makes and whether each holds.

Defaults: SmolLM2-135M-Instruct, 16 collection + 16 evaluation episodes per condition x 10 steps, 40 conditions
plus 3 x 3 x 16 null draws on 4 episodes each; the report gives each phase's wall time. `--second-model
gemma-3-270m` repeats the study with a base model on a plain-text prompt (give `--primary layermain/beta0.5`:
its swept layers differ).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

import models
from experiments.lib import bandit
from experiments.common import Report, Study, fmt, lap, save_figure
from interp import stats
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
    n_null: int = 16  # random same-norm directions per layer x beta: the null distribution (K draws)
    null_episodes: int = 4  # evaluation episodes (the first ones) each null draw plays (<= n_episodes)
    primary: str = "layer15/beta0.5"  # verdict: EAST - best same-layer control here (layermain: middle swept layer)
    alpha: float = 0.05  # level of the verdict (Holm over every layer x beta cell) and of every interval (1 - alpha)
    n_boot: int = 10000  # bootstrap resamples of each interval
    seed: int = 0  # bandits, reward noise, action draws, random directions, shuffles, resampling
    out: str = "runs"  # reports go to OUT/<experiment>/<timestamp>/

    def __post_init__(self):
        """InputError naming the flag for any field out of range (before a model loads)."""
        ints = dict(steps=(self.steps, 2), n_collect=(self.n_collect, 1), n_episodes=(self.n_episodes, 1),
                    chunk=(self.chunk, 1), samples=(self.samples, 1), max_new_tokens=(self.max_new_tokens, 1),
                    sampled_prompts=(self.sampled_prompts, 0), n_null=(self.n_null, 1),
                    null_episodes=(self.null_episodes, 1), n_boot=(self.n_boot, 100))
        for name, (v, lo) in ints.items():
            if v < lo:
                raise InputError(f"--{name.replace('_', '-')} {v}: must be >= {lo}")
        for name, v, hi in (("window", self.window, self.steps), ("first_k", self.first_k, self.steps),
                            ("null_episodes", self.null_episodes, self.n_episodes)):
            if not 1 <= v <= hi:
                raise InputError(f"--{name.replace('_', '-')} {v} out of range: valid 1..{hi}")
        if not self.betas:
            raise InputError("--betas is empty: give at least one steering strength")
        if not all(np.isfinite(b) and b > 0 for b in self.betas):
            raise InputError(f"--betas {self.betas}: every strength must be finite and > 0 (0 is the unsteered run)")
        if len(set(self.betas)) != len(self.betas):
            raise InputError(f"--betas {self.betas} repeats a strength")
        if not all(np.isfinite(t) and t > 0 for t in self.temperatures):
            raise InputError(f"--temperatures {self.temperatures}: every temperature must be finite and > 0")
        if not (np.isfinite(self.sigma) and self.sigma >= 0):
            raise InputError(f"--sigma {self.sigma}: must be finite and >= 0")
        if not np.isfinite(self.gap):
            raise InputError(f"--gap {self.gap}: must be finite")
        if not 0 < self.alpha < 1:
            raise InputError(f"--alpha {self.alpha} out of range: valid (0, 1)")
        if len(set(self.layers)) != len(self.layers):
            raise InputError(f"--layers {self.layers} repeats a layer")
        layer, beta = primary_cell(self.primary)
        if not any(np.isclose(beta, b) for b in self.betas):
            raise InputError(f"--primary {self.primary!r}: beta {beta:g} is not one of --betas {self.betas}")
        if layer != "main" and self.layers and int(layer) not in self.layers:
            raise InputError(f"--primary {self.primary!r}: layer {layer} is not one of --layers {self.layers}")


_PRIMARY = re.compile(r"layer(\d+|main)/beta([0-9.eE+-]+)")


def primary_cell(primary: str) -> tuple[str, float]:
    """`"layer15/beta0.5"` -> `("15", 0.5)`; `"layermain/beta0.5"` -> `("main", 0.5)`; InputError otherwise."""
    m = _PRIMARY.fullmatch(primary)
    try:
        beta = float(m.group(2)) if m else float("nan")
    except ValueError:
        beta = float("nan")
    if not np.isfinite(beta):
        raise InputError(f"--primary {primary!r}: expected 'layer<L>/beta<b>' (e.g. layer15/beta0.5) or "
                         "'layermain/beta<b>' (the middle swept layer), with b one of --betas")
    return m.group(1), beta


def cell(layer: int, beta: float) -> str:
    """The name of a layer x beta cell, as `primary` names it."""
    return f"layer{layer}/beta{beta:g}"


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


_OPEN = "*_\"'`([ \t"  # emphasis, quotes or brackets allowed before an action name
_CLOSE = ".,;:!?*_\"'`)]}"  # punctuation that may end a leading action name


def parse_action(text: str, names) -> str | None:
    """The button a sampled completion chooses, or None (invalid).

    The first explicit "Action: X" wins, X a button name as a whole word (after optional spaces, `*`, quotes or
    brackets: "Action: **B**"); a later "Action:" (e.g. a second, contradicting one) is ignored. Without one, a
    completion that *starts* with a button name counts only if the name stands alone: followed by the end of the
    text or line, or by punctuation ("A.", "B, because", "A"), so the article in " A higher reward came from B"
    is not action A, nor is "Apples". Names are matched case-sensitively, longest first."""
    alts = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    explicit = re.search(rf"Action:[\s{re.escape(_OPEN)}]*({alts})(?!\w)", text)
    if explicit:
        return explicit.group(1)
    lead = re.match(rf"\s*[{re.escape(_OPEN)}]*({alts})(?=[ \t]*(?:$|\n|[{re.escape(_CLOSE)}]))", text)
    return lead.group(1) if lead else None


def validate(cfg: Config, n_layers: int) -> tuple[tuple[int, ...], str]:
    """The layers to use and the primary cell's name (`cell`); InputError naming the flag for a layer out of
    range for this model (the other fields are checked by `Config`)."""
    layers = cfg.layers or tuple(sorted({n_layers // 3, n_layers // 2, (2 * n_layers) // 3}))
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise InputError(f"--layers {layers}: layer {bad[0]} out of range for a model of {n_layers} layers "
                         f"(valid 0..{n_layers - 1})")
    layers = tuple(int(l) for l in layers)
    layer, beta = primary_cell(cfg.primary)
    layer = layers[len(layers) // 2] if layer == "main" else int(layer)
    if layer not in layers:
        raise InputError(f"--primary {cfg.primary!r}: layer {layer} is not swept (layers {layers}; give --layers "
                         "or --primary layermain/beta<b>)")
    beta = next(b for b in cfg.betas if np.isclose(b, beta))
    return layers, cell(layer, beta)


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


class Group(NamedTuple):
    """Conditions that play the same episodes: vectors `[N, D]` added with scales `[N, L]` (one per layer) at the
    last prompt token, sampling temperatures `[N]`, each condition on the first `episodes` bandits (0: all)."""

    vectors: np.ndarray
    scales: np.ndarray
    temps: np.ndarray
    episodes: int = 0


def run_episodes(m, cfg: Config, prompt: Prompt, env: bandit.Bandits, groups, key, layers: tuple[int, ...],
                 chat: bool) -> list[dict]:
    """Play `cfg.steps` presses under every condition of every `Group` (`N_g` conditions x `E_g` episodes each;
    episode e is bandit e of `env`, with the same reward noise and action draws in every condition). All rows
    advance together in chunks of `cfg.chunk`, one batched forward per step: each row keeps a KV cache of its
    prompt so far, and a step runs only the newest history line and the tail (the shared head is computed once).
    Returns per group `probs [N_g, E_g, T, 2]`, `actions`, `rewards [N_g, E_g, T]`, `z [N_g, len(layers), E_g, T,
    D]`; the first group's also `texts` (the prompts of its condition 0, `[T][E_0]`)."""
    E, T = env.means.shape[0], cfg.steps
    sizes = [g.episodes or E for g in groups]
    if not all(1 <= e <= E for e in sizes):
        raise InputError(f"group episodes {sizes} out of range: valid 1..{E} (the bandits given)")
    vectors = np.concatenate([np.asarray(g.vectors, np.float32) for g in groups])
    scales = np.concatenate([np.asarray(g.scales, np.float32) for g in groups])
    temps = np.concatenate([np.asarray(g.temps, np.float32) for g in groups])
    starts = np.cumsum([0] + [len(g.vectors) for g in groups])
    cond = np.concatenate([s + np.repeat(np.arange(len(g.vectors)), e) for s, g, e in zip(starts, groups, sizes)])
    episode = np.concatenate([np.tile(np.arange(e), len(g.vectors)) for g, e in zip(groups, sizes)])
    ids = jnp.asarray(action_ids(m, prompt))
    pieces = _Tokens(m, prompt, chat, T)
    draws = np.asarray(jax.random.uniform(key, (T, E)))  # shared by the conditions (common random numbers)
    inv_t = 1.0 / temps
    means, noise = np.asarray(env.means), np.asarray(env.noise)
    R = len(cond)
    n_chunks = -(-R // cfg.chunk)
    B = -(-R // n_chunks)  # rows per chunk: every chunk the same shape (the last padded), one compiled program
    piece_len = max(len(pieces.piece(p)) for a in (0, 1) for p in prompt.history([a] * T, [-9999.0] * T) + prompt.history([], []))
    width = _round_up(piece_len) + len(pieces.tail)
    slots = len(pieces.head) + T * width
    actions, rewards = np.zeros((R, T), np.int32), np.zeros((R, T), np.float32)
    probs, zs = np.zeros((R, T, 2), np.float32), np.zeros((len(layers), R, T, m.cfg.d_model), np.float32)
    for c in range(n_chunks):
        rows = np.minimum(np.arange(c * B, (c + 1) * B), R - 1)  # the last chunk repeats its final row
        n_of, e_of = cond[rows], episode[rows]
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
    E0 = sizes[0]
    texts = [[prompt.text(m, chat, T, actions[e, :t], rewards[e, :t]) for e in range(E0)] for t in range(T)]
    out, row = [], 0
    for g, e in zip(groups, sizes):
        n = len(g.vectors)
        sl = slice(row, row + n * e)
        unflat = lambda x: x.reshape(n, e, *x.shape[1:])  # noqa: B023
        out.append(dict(probs=unflat(probs[sl]), actions=unflat(actions[sl]), rewards=unflat(rewards[sl]),
                        z=zs[:, sl].reshape(len(layers), n, e, T, -1).transpose(1, 0, 2, 3, 4)))
        row += n * e
    out[0]["texts"] = texts
    return out


def final_entropy(res: dict, cfg: Config) -> np.ndarray:
    """Per condition and episode, the mean policy entropy over the last `cfg.window` steps `[N, E]` (nats)."""
    return np.asarray(bandit.entropy(res["probs"]))[:, :, -cfg.window:].mean(-1)


def summarise(res: dict, env: bandit.Bandits, cfg: Config) -> list[dict]:
    """Per condition: entropy per step, final-window entropy (mean, sem over episodes), fraction trying both
    arms in the first k steps, final cumulative regret, fraction of presses on the better arm."""
    h = np.asarray(bandit.entropy(res["probs"]))  # [N, E, T]
    out = []
    for n in range(h.shape[0]):
        a = jnp.asarray(res["actions"][n])
        final = final_entropy(res, cfg)[n]
        better = np.asarray(jnp.argmax(env.means, 1))[:, None]
        out.append(dict(entropy_per_step=h[n].mean(0).tolist(), final_entropy=float(final.mean()),
                        final_entropy_sem=float(final.std(ddof=1) / np.sqrt(len(final))) if len(final) > 1 else float("nan"),
                        tried_both=float(np.mean(bandit.tried_both(a, cfg.first_k))),
                        regret=float(np.mean(bandit.regret(env, a)[:, -1])),
                        better_arm=float(np.mean(res["actions"][n] == better))))
    return out


def build_vectors(col: dict, layers, cfg: Config, L: int, D: int, key) -> dict:
    """Per swept layer: EAST, entropy-shuffled and step-index vectors, a random direction and `cfg.n_null` more
    (`null [K, D]`, independent of it), as unit vectors, with `|u|` and the mean residual norm `|z|` at that
    layer (collection episodes: z `[len(layers), K, T, D]`)."""
    h = np.asarray(bandit.entropy(col["probs"][0]))  # [K, T]
    perm = np.random.default_rng(cfg.seed).permutation(h.size)
    h_shuf = h.reshape(-1)[perm].reshape(h.shape)
    unit = lambda v: np.asarray(v / jnp.linalg.norm(v, axis=-1, keepdims=True), np.float32)
    out = {}
    for i, l in enumerate(layers):
        z = jnp.asarray(col["z"][0, i])
        u = bandit.east_vector(z, h)
        out[l] = dict(east=unit(u), shuffled=unit(bandit.east_vector(z, h_shuf)), step=unit(bandit.step_index_vector(z)),
                      random=unit(jax.random.normal(jax.random.fold_in(key, l), (D,))),
                      null=unit(jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, l), 1), (cfg.n_null, D))),
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


def null_group(vecs: dict, layers, cfg: Config, L: int) -> Group:
    """The null draws: at every layer x beta (in that order) the `K` random unit directions of `vecs[l]["null"]`,
    each scaled to EAST's added norm there, on the first `cfg.null_episodes` bandits (`N = layers x betas x K`)."""
    K = cfg.n_null
    vectors = np.concatenate([vecs[l]["null"] for l in layers for _ in cfg.betas])
    scales = np.zeros((len(vectors), L), np.float32)
    for i, (l, b) in enumerate((l, b) for l in layers for b in cfg.betas):
        scales[i * K:(i + 1) * K, l] = b * vecs[l]["z_norm"]
    return Group(vectors, scales, np.ones(len(vectors), np.float32), cfg.null_episodes)


def sampled_mode(m, cfg: Config, col: dict, vecs: dict, main: int, chat: bool, key) -> list[dict]:
    """The paper's readout on `sampled_prompts` collection prompts: `samples` completions after "Thought:" for
    unsteered (T = 1), EAST at the main layer and largest beta (T = 1, steering the last prompt token and every
    generated token) and the largest temperature; action read by `parse_action`; valid rate (Wilson interval), entropy
    of the parsed action distribution (mean over prompts with a valid completion) and the exact-readout entropy."""
    if cfg.sampled_prompts == 0:
        return []
    flat = [t for step in col["texts"] for t in step]
    h_exact = np.asarray(bandit.entropy(col["probs"][0])).T.reshape(-1)  # step-major, as `flat`
    pick = np.random.default_rng(cfg.seed + 1).choice(len(flat), min(cfg.sampled_prompts, len(flat)), replace=False)
    prompts = [flat[i][:-len("Action:")] + "Thought:" for i in pick]
    names = Prompt().names
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
        parsed = [parse_action(t, names) for t in texts]
        acts = np.array([-1 if p is None else names.index(p) for p in parsed]).reshape(len(prompts), cfg.samples)
        hs = [float(bandit.entropy(np.bincount(r[r >= 0], minlength=2) / np.sum(r >= 0))) for r in acts if np.any(r >= 0)]
        valid = stats.wilson(int(np.sum(acts >= 0)), acts.size, 1 - cfg.alpha)
        out.append(dict(condition=name, valid_rate=valid.value, valid_lo=valid.lo, valid_hi=valid.hi, n=acts.size,
                        n_valid=int(np.sum(acts >= 0)), entropy=float(np.mean(hs)) if hs else float("nan"),
                        n_prompts_valid=len(hs), exact_entropy=float(h_exact[pick].mean()), example=texts[0][:160]))
    return out


def _figures(out, tag: str, names, kinds, summ, sampled, layers, main, cfg: Config, comparisons):
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
        if key == "final_entropy":  # the null's 5-95% band and EAST on the same (first) episodes
            cs = [c for c in comparisons if f"L{c['layer']}" == layer]
            ax.fill_between(cfg.betas, [c["null"].band[0] for c in cs], [c["null"].band[1] for c in cs], color="grey",
                            alpha=0.25, label=f"null 5-95% ({cfg.n_null} random, first {cfg.null_episodes} episodes)")
            ax.plot(cfg.betas, [c["null"].observed for c in cs], "x", color="C0", label="EAST, same episodes")
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


def compare(final: np.ndarray, final_null: np.ndarray, names: list[str], layers, cfg: Config) -> list[dict]:
    """Per layer x beta: EAST's final-window entropy against its same-layer controls and the unsteered run (paired
    per-episode differences over the `E` shared episodes, one-sided "greater") and against the null of `cfg.n_null`
    random directions (`final_null [layers x betas x K, null_episodes]`; EAST's mean over the same first episodes).
    `final [N, E]` is `final_entropy` of the evaluation conditions `names` (condition 0 unsteered)."""
    K, E0, lvl = cfg.n_null, cfg.null_episodes, 1 - cfg.alpha
    test = partial(stats.paired_difference, n_boot=cfg.n_boot, level=lvl, seed=cfg.seed, alternative="greater")
    out = []
    for i, (l, b) in enumerate((l, b) for l in layers for b in cfg.betas):
        e = final[names.index(f"EAST L{l} beta {b:g}")]
        ctrl = {k: final[names.index(f"{k} L{l} beta {b:g}")] for k in CONTROLS}
        top = max(ctrl, key=lambda k: ctrl[k].mean())
        draws = final_null[i * K:(i + 1) * K].mean(1)
        out.append(dict(layer=l, beta=b, cell=cell(l, b), east=float(e.mean()),
                        controls={k: float(c.mean()) for k, c in ctrl.items()}, best_control=top,
                        vs_control=test(e, ctrl[top], label=f"EAST - {top}"),
                        vs_unsteered=test(e, final[0], label="EAST - unsteered"),
                        null=stats.null_test(float(e[:E0].mean()), draws, "greater", label=f"EAST vs {K} random")))
    return out


def _est(e) -> dict:
    """An `Estimate` or `NullTest` as JSON."""
    if isinstance(e, stats.NullTest):
        return dict(observed=e.observed, percentile=e.percentile, band=list(e.band), p=e.p, k=e.k,
                    null=e.null.tolist())
    return dict(value=e.value, lo=e.lo, hi=e.hi, n=e.n, p=e.p, method=e.method)


def study(m, cfg: Config, out) -> Report:
    """The whole study for one agent (figures into the folder `out`); `cfg.chat`: its prompts use the chat
    template."""
    chat, tag = cfg.chat, cfg.model
    L, D = m.cfg.n_layers, m.cfg.d_model
    layers, primary = validate(cfg, L)
    main = layers[len(layers) // 2]
    key = jax.random.PRNGKey(cfg.seed)
    k_col, k_env, k_act, k_dir, k_tr, k_s = jax.random.split(key, 6)
    prompt = Prompt()
    zero = Group(np.zeros((1, D), np.float32), np.zeros((1, L), np.float32), np.ones(1, np.float32))
    col_env = bandit.make_bandits(k_col, cfg.n_collect, cfg.steps, cfg.gap, cfg.sigma)
    (col,) = run_episodes(m, cfg, prompt, col_env, [zero], jax.random.fold_in(k_act, 0), layers, chat)
    lap("collection")
    vecs = build_vectors(col, layers, cfg, L, D, k_dir)
    names, kinds, betas, temps, vectors, scales = conditions(vecs, layers, main, cfg, L, D)
    env = bandit.make_bandits(k_env, cfg.n_episodes, cfg.steps, cfg.gap, cfg.sigma)
    res, res_null = run_episodes(m, cfg, prompt, env, [Group(vectors, scales, np.asarray(temps, np.float32)),
                                                       null_group(vecs, layers, cfg, L)], k_act, (main,), chat)
    summ, final, final_null = summarise(res, env, cfg), final_entropy(res, cfg), final_entropy(res_null, cfg)
    lap("evaluation + null")
    tr_rows = [0] + [names.index(f"EAST L{main} beta {b:g}") for b in cfg.betas]
    (res_tr,) = run_episodes(m, cfg, REWORDED, env, [Group(vectors[tr_rows], scales[tr_rows],
                                                           np.ones(len(tr_rows), np.float32))], k_act, (main,), chat)
    transfer, final_tr = summarise(res_tr, env, cfg), final_entropy(res_tr, cfg)
    lap("transfer")
    sampled = sampled_mode(m, cfg, col, vecs, main, chat, k_s)
    lap("sampled mode")

    comparisons = compare(final, final_null, names, layers, cfg)
    by_cell = {c["cell"]: c for c in comparisons}
    p_cell = by_cell[primary]
    v = stats.verdict({c["cell"]: c["vs_control"] for c in comparisons}, primary, alpha=cfg.alpha,
                      alternative="greater", what=f"EAST minus its best same-layer, same-norm control at {primary} "
                                                  "(final-window entropy, nats, paired over episodes)")
    null_holm = stats.holm([c["null"].p for c in comparisons])
    _figures(out, tag, names, kinds, summ, sampled, layers, main, cfg, comparisons)

    lvl = f"{100 * (1 - cfg.alpha):g}%"
    h_col = np.asarray(bandit.entropy(col["probs"][0]))
    rows = []
    for n, name in enumerate(names):
        l = int(np.argmax(scales[n])) if scales[n].any() else main
        raw = betas[n] * vecs[l]["z_norm"] / vecs[l]["u_norm"] if kinds[n].startswith("EAST") else float("nan")
        mean = stats.bootstrap(final[n], n_boot=cfg.n_boot, level=1 - cfg.alpha, seed=cfg.seed)
        rows.append([name, f"{betas[n]:g}", fmt(raw, ".3g"), f"{temps[n]:g}", str(mean), f"{summ[n]['tried_both']:.2f}",
                     f"{summ[n]['regret']:.1f}", f"{summ[n]['better_arm']:.2f}"])
    table = stats.markdown_table(["condition", "beta (x mean norm of z)", "raw beta (paper's)", "temperature",
                                  f"final-window entropy [{lvl} bootstrap CI over episodes]",
                                  f"tried both in first {cfg.first_k}", "regret", "better arm"], rows)
    c_table = stats.markdown_table(
        ["layer", "beta", "EAST", "random", "shuffled", "step-index", f"EAST − best control [{lvl} CI] (n, p)",
         "Holm p", f"EAST − unsteered [{lvl} CI] (n, p)",
         f"EAST vs null: percentile of {cfg.n_null} draws (null 5–95%, first {cfg.null_episodes} episodes)",
         "null p (Holm)"],
        [[c["layer"], f"{c['beta']:g}" + (" (primary)" if c["cell"] == primary else ""), f"{c['east']:.3f}",
          *[f"{c['controls'][k]:.3f}" for k in CONTROLS], f"{c['vs_control']} vs {c['best_control']}",
          f"{v.p_holm[c['cell']]:.2g}", str(c["vs_unsteered"]),
          f"{c['null'].percentile:.0f} ({c['null'].observed:.3f} vs "
          f"[{c['null'].band[0]:.3f}, {c['null'].band[1]:.3f}])",
          f"{c['null'].p:.2g} ({h:.2g})"] for c, h in zip(comparisons, null_holm)])
    sig = [c["cell"] for c in comparisons if v.p_holm[c["cell"]] < cfg.alpha and c["vs_control"].lo > 0]
    above_null = [c["cell"] for c, h in zip(comparisons, null_holm) if h < cfg.alpha]
    temp = {t: final[names.index(f"temperature {t:g}")] for t in cfg.temperatures}
    test = partial(stats.paired_difference, n_boot=cfg.n_boot, level=1 - cfg.alpha, seed=cfg.seed)
    body = (f"Unsteered, the mean policy entropy goes from {summ[0]['entropy_per_step'][0]:.3f} at step 1 to "
            f"{summ[0]['entropy_per_step'][-1]:.3f} nats at step {cfg.steps} (max ln 2 = 0.693). The unit of every "
            f"interval is the episode (n = {cfg.n_episodes}); every condition plays the same bandits, reward noise "
            "and action draws, so EAST is compared with a control or the unsteered run by the paired per-episode "
            "difference (percentile bootstrap interval; exact sign-flip p, one-sided: EAST higher), and with the "
            f"null by its percentile among {cfg.n_null} random same-norm directions on the same first "
            f"{cfg.null_episodes} episodes (p = (1 + #draws >= EAST) / (K + 1)). Holm over the "
            f"{len(comparisons)} layer x beta cells.\n\n{v.sentence}\n\n{c_table}\n\n"
            + (f"Cells where EAST beats its best control after Holm: {', '.join(sig)}." if sig else
               "**EAST beats its best same-layer control in no layer x beta cell after Holm.**")
            + " " + (f"Cells above the random-direction null after Holm: {', '.join(above_null)}." if above_null else
                     "No cell is above the random-direction null after Holm.")
            + (f" With K = {cfg.n_null} draws the smallest attainable null p is 1/(K+1) = {1 / (cfg.n_null + 1):.3f}, "
               f"not below alpha = {cfg.alpha:g}: the null places EAST (percentile, band) but cannot reject at this "
               f"level (--n-null >= {int(np.ceil(1 / cfg.alpha))} for one cell)." if 1 / (cfg.n_null + 1) >= cfg.alpha
               else "")
            + " Temperatures " + ", ".join(f"{t:g}: {test(h, final[0])}" for t, h in temp.items())
            + " (minus unsteered): in the exact readout a temperature divides the two action logits, so it flattens "
            "the policy by construction; the paper's claim that temperature fails concerns sampled chains of thought "
            "(the sampled-mode table).")
    vec_text = "\n".join(f"- layer {l}: |u| = {v_['u_norm']:.3f}, mean |z| = {v_['z_norm']:.2f}, cos(u, step-index "
                         f"vector) = {v_['cos_step']:.3f}, cos(u, shuffled-entropy vector) = {v_['cos_shuffled']:.3f}"
                         for l, v_ in vecs.items())
    tr_diffs = [test(final_tr[i], final_tr[0]) for i in range(1, len(tr_rows))]
    tr_table = stats.markdown_table(
        ["condition (reworded prompt, red / blue)", f"final-window entropy [{lvl} CI]", f"minus unsteered [{lvl} CI]",
         "tried both", "regret"],
        [[names[r], str(stats.bootstrap(final_tr[i], n_boot=cfg.n_boot, level=1 - cfg.alpha, seed=cfg.seed)),
          "" if i == 0 else str(tr_diffs[i - 1]), f"{s['tried_both']:.2f}", f"{s['regret']:.1f}"]
         for i, (r, s) in enumerate(zip(tr_rows, transfer))])
    s_table = stats.markdown_table(
        ["sampled mode", f"valid rate [{lvl} Wilson] (n)", "entropy of parsed actions",
         "prompts with a valid completion", "exact-readout entropy"],
        [[s["condition"], f"{s['valid_rate']:.2f} [{s['valid_lo']:.2f}, {s['valid_hi']:.2f}] ({s['n']})",
          f"{s['entropy']:.3f}", s["n_prompts_valid"], f"{s['exact_entropy']:.3f}"] for s in sampled])

    # the README's claims for EAST, each with its statistic
    h_all = np.asarray(bandit.entropy(res["probs"][0]))  # [E, T]
    fall = test(h_all[:, 0], final[0], alternative="greater")
    floor = stats.bootstrap(final[0], n_boot=cfg.n_boot, level=1 - cfg.alpha, seed=cfg.seed)
    regret = np.stack([np.asarray(bandit.regret(env, jnp.asarray(a)))[:, -1] for a in res["actions"]])  # [N, E]
    d_regret = [test(regret[n], regret[0]) for n in range(1, len(names))]
    worst = max(range(len(d_regret)), key=lambda i: abs(d_regret[i].value))
    cos = [vecs[l]["cos_step"] for l in layers]
    t_max = max(cfg.temperatures) if cfg.temperatures else None
    claims = [
        stats.Claim("Unsteered, the policy entropy falls over an episode but stays above 0.1 nats",
                    f"step 1 − final window {fall}; final window {floor}",
                    bool(fall.lo > 0 and fall.p < cfg.alpha and floor.lo > 0.1)),
        stats.Claim(f"EAST raises final-window entropy more than its best same-layer, same-norm control at {primary} "
                    "(primary)", f"{p_cell['vs_control']} vs {p_cell['best_control']}, Holm p "
                    f"{v.p_holm[primary]:.2g}", v.holds),
        stats.Claim(f"EAST at {primary} lies above the random-direction null", str(p_cell["null"]),
                    bool(p_cell["null"].p < cfg.alpha)),
        stats.Claim(f"EAST raises final-window entropy over the unsteered run at {primary}",
                    str(p_cell["vs_unsteered"]),
                    bool(p_cell["vs_unsteered"].lo > 0 and p_cell["vs_unsteered"].p < cfg.alpha)),
        stats.Claim("EAST is not specific: no layer x beta cell beats its best control after Holm",
                    f"{len(sig)} of {len(comparisons)} cells" + (f" ({', '.join(sig)})" if sig else ""), not sig),
        stats.Claim("The EAST vector is mostly the step-index direction (cosine >= 0.9 at every swept layer)",
                    "cosines " + ", ".join(f"L{l} {c:.3f}" for l, c in zip(layers, cos)), bool(min(cos) >= 0.9)),
        stats.Claim("Steering moves regret by at most 2 (a random policy's is 25) in every condition",
                    f"largest: {names[worst + 1]} {d_regret[worst]}", bool(abs(d_regret[worst].value) <= 2)),
    ]
    if t_max is not None:
        d = test(temp[t_max], final[0], alternative="greater")
        claims.append(stats.Claim(f"Temperature {t_max:g} raises entropy in the exact readout", str(d),
                                  bool(d.lo > 0 and d.p < cfg.alpha)))
    claims.append(stats.Claim(f"The vectors transfer: EAST L{main} beta {max(cfg.betas):g} raises entropy on the "
                              "reworded red / blue prompt", str(tr_diffs[-1]),
                              bool(tr_diffs[-1].lo > 0 and tr_diffs[-1].p < cfg.alpha)))
    if sampled:
        s0 = sampled[0]
        claims.append(stats.Claim(f"In sampled mode the agent rarely writes a parseable action (valid rate < 0.1, "
                                  f"{s0['condition']})", f"{s0['valid_rate']:.2f} [{s0['valid_lo']:.2f}, "
                                  f"{s0['valid_hi']:.2f}] (n={s0['n']})", bool(s0["valid_hi"] < 0.1)))

    sections = [
        ("setup", f"Agent {m.name} ({'chat template' if chat else 'plain-text prompt'}); two-armed bandit, arm "
                          f"means 10 and {10 + cfg.gap:g} (better arm random per episode), reward sd {cfg.sigma:g}, "
                          f"{cfg.steps} presses; exact policy readout at \"Action:\". Vectors from n = {cfg.n_collect} "
                          f"unsteered episodes x {cfg.steps} steps ({cfg.n_collect * cfg.steps} prompts; Z = sum "
                          "of h); "
                          f"evaluation n = {cfg.n_episodes} episodes per condition, the same bandits, reward noise and "
                          f"action draws for every condition; null: {cfg.n_null} random directions at each of "
                          f"{len(layers)} layers x {len(cfg.betas)} betas on the first {cfg.null_episodes} episodes "
                          f"({len(layers) * len(cfg.betas) * cfg.n_null * cfg.null_episodes} episodes, batched "
                          f"with the others); seed {cfg.seed}. Main layer {main}; primary comparison {primary}. "
                          "Every steering "
                          "vector (EAST, controls, null) is scaled to the same added norm beta x mean |z|.\n\n"
                          + vec_text),
        ("entropy vs beta vs temperature", table + "\n\n![entropy per step](east_entropy_per_step.png)\n"
                                                   "![sweep](east_sweep.png)"),
        ("EAST against its controls and the null", body + "\n\nThe verdict's cells:\n\n" + v.table),
        ("transfer to a reworded prompt", "The vectors from the A / B prompt, applied to a prompt with other "
                                                  "wording and buttons red / blue (same bandits):\n\n" + tr_table),
        ("sampled mode", (f"{min(cfg.sampled_prompts, cfg.n_collect * cfg.steps)} collection prompts x "
                                  f"{cfg.samples} completions of {cfg.max_new_tokens} tokens after \"Thought:\", action "
                                  "read by `parse_action` (the first explicit \"Action: <button>\", else a leading "
                                  "button name standing alone), invalid completions dropped:\n\n" + s_table +
                                  "\n\nExample: " + repr(sampled[0]["example"])) if sampled else "skipped (--sampled-prompts 0)"),
        ("Claims", stats.claims_section(claims)),
    ]
    metrics = dict(layers=list(layers), main_layer=main, primary=primary,
                   verdict=dict(holds=v.holds, sentence=v.sentence, p_holm=v.p_holm),
                   conditions=dict(zip(names, summ)),
                   east_vs_controls=[dict(layer=c["layer"], beta=c["beta"], east=c["east"], controls=c["controls"],
                                          best_control=c["best_control"], vs_control=_est(c["vs_control"]),
                                          vs_unsteered=_est(c["vs_unsteered"]), null=_est(c["null"]),
                                          holm_p=v.p_holm[c["cell"]], null_holm_p=float(h))
                                     for c, h in zip(comparisons, null_holm)],
                   transfer={names[r]: s for r, s in zip(tr_rows, transfer)}, sampled=sampled,
                   claims=[dict(text=c.text, statistic=c.statistic, holds=c.holds) for c in claims],
                   vectors={str(l): {k: v_[k] for k in ("u_norm", "z_norm", "cos_step", "cos_shuffled")}
                            for l, v_ in vecs.items()},
                   collection_entropy_per_step=h_col.mean(0).tolist())
    return Report(sections, metrics)


def check(cfg: Config) -> None:
    """Before any model loads: a layer-named primary cell cannot apply to a second agent's own default layers."""
    if cfg.second_model and not cfg.layers and primary_cell(cfg.primary)[0] != "main":
        raise InputError(f"--primary {cfg.primary!r} names a layer, but --second-model {cfg.second_model} sweeps its "
                         "own default layers: give --primary layermain/beta<b> (the middle swept layer) or --layers")


def second_agent(cfg: Config) -> Config:
    """The second agent's config: a base model, so plain-text prompts."""
    return dataclasses.replace(cfg, model=cfg.second_model, second_model="", chat=False)


STUDY = Study("east", "Entropic activation steering of an LLM bandit agent (Rahn et al. 2024)", Config, study, __doc__,
              check=check, second=second_agent, subdir="second_agent")


def main(argv=None, cfg: Config | None = None):
    """`python -m experiments.east`: the run folder and its metrics (`{model: metrics}`)."""
    return STUDY.main(argv, cfg)


if __name__ == "__main__":
    main()
