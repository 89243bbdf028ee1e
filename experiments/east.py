"""Entropic activation steering (EAST, Rahn et al. 2024, arXiv 2406.00244) of an LLM agent in a two-armed bandit.

    python -m experiments.east [--model NAME_OR_DIR] [--layers 10,15,20] [--betas 1,2,4] [--second-model gemma-3-270m]

The agent plays `steps` presses of a two-armed Gaussian bandit (`experiments.bandit`; sd `sigma`), the history
of (button, reward) in its prompt. Its policy is read exactly (default): the prompt ends with "Action:" and
pi(a) is the next-token probability of the two button tokens, renormalised over the two (no sampling noise, no
parse failures); every step of every episode of every condition advances in one vmapped forward. The sampled
mode (the paper's) is checked on a subset of prompts: M completions after "Thought:", the action parsed from
"Action: <button>", invalid completions dropped, the valid rate reported.

EAST vector at each layer l of `layers`: from `n_collect` unsteered episodes, `z_t^k` = `resid_post` at the last
prompt token, `h_t^k` the policy entropy, `u = sum_k sum_t h_t^k (z_t^k - mean_t' z_t'^k) / sum h`. Steering adds
`beta * |z|_l * u / |u|` at layer l at the last prompt token (and, in sampled mode, at each generated token):
beta is in units of the layer's mean residual norm `|z|_l` (the report gives the paper's raw coefficient
`beta * |z|_l / |u|` too). All conditions -- EAST at each layer x beta, the controls (a random direction, the
vector with entropies shuffled across prompts, the step-index vector `sum (tbar - t)(z - zbar)`; each scaled to
the same added norm), unsteered sampling temperatures (pi ∝ p^(1/T)) -- run on the same bandits and reward noise
(common random numbers) as one vmapped program per step; interventions are data (a per-layer `AddVector`
whose scale is zero except at the steered layer). Transfer: the vectors from the main prompt applied to a
reworded prompt with other button names (red / blue).

Defaults: SmolLM2-135M-Instruct, 16 collection + 16 evaluation episodes per condition x 10 steps, 22 conditions
(about 0.75 M prompt tokens in all): estimated 10-15 minutes on a quiet 2-core CPU (2-3x that under load; the
tiny smoke configuration takes 7 minutes under load, mostly compilation). `--second-model gemma-3-270m` repeats the study
with a base model on a plain-text prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

import models
from experiments import bandit
from experiments.common import fmt, parse_config, run_dir, save_figure, undefined_to_none, write_report
from interp.interventions import AddVector
from models import transformer
from models.errors import InputError
from models.transformer import Capture

SITE = "resid_post"


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

    def text(self, m, chat: bool, n: int, actions, rewards, prefill: str = "Action:") -> str:
        """The prompt after `len(actions)` presses, ending in `prefill` (rewards shown rounded to integers)."""
        hist = [self.line.format(i=i + 1, name=self.names[int(a)], r=int(round(float(r))))
                for i, (a, r) in enumerate(zip(actions, rewards))]
        user = (self.intro.format(a=self.names[0], b=self.names[1], n=n) + "\n\n"
                + ("\n".join(hist) if hist else self.empty))
        if chat:
            return m.apply_chat_template([{"role": "user", "content": user}]) + prefill
        return user + "\n\n" + prefill


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


@eqx.filter_jit
def _step(model, tokens, mask, vectors, scales, ids, layers: tuple[int, ...], per_chunk: int):
    """Action logits `[N, B, 2]` and `resid_post` at the last prompt token `[N, len(layers), B, D]` for `N`
    conditions of `B` prompts each (`tokens [N, B, T]`), condition n steered by `scales[n, l] * vectors[n, l]`
    at each layer l (last prompt token); `per_chunk` conditions per vmapped chunk."""

    def one(args):
        tok, msk, vec, sc = args
        steer = AddVector(SITE, vec, sc, per_layer=True, positions=(-1,))
        capture = (Capture(SITE, layers=layers, seq_indices=(-1,)), Capture("final_norm", seq_indices=(-1,)))
        _, acts = transformer.forward(model.params, model.cfg, tok, msk, None, capture, (steer,))
        logits = transformer.unembed(model.params, acts["final_norm"][:, 0], model.cfg)  # logits at the last token only
        return logits[:, ids], acts[SITE][:, :, 0]

    return jax.lax.map(one, (tokens, mask, vectors, scales), batch_size=per_chunk)


def _pad(tok: np.ndarray, mask: np.ndarray, bucket: int = 64):
    """Left-pad to a multiple of `bucket` tokens, so the step program compiles for few lengths."""
    extra = -tok.shape[1] % bucket
    return np.pad(tok, ((0, 0), (extra, 0))), np.pad(mask, ((0, 0), (extra, 0)))


def run_episodes(m, cfg: Config, prompt: Prompt, env: bandit.Bandits, vectors, scales, temps, key,
                 layers: tuple[int, ...], chat: bool) -> dict:
    """Play `E` episodes of `cfg.steps` presses under each of `N` conditions (vectors `[N, L, D]`, scales `[N, L]`,
    temperatures `[N]`), every step of all N x E episodes in one vmapped program. Returns `probs [N, E, T, 2]`,
    `actions`, `rewards [N, E, T]`, `z [N, len(layers), E, T, D]`, `texts` (the prompts of condition 0)."""
    N, E, T = vectors.shape[0], env.means.shape[0], cfg.steps
    ids = jnp.asarray(action_ids(m, prompt))
    actions, rewards = np.zeros((N, E, T), np.int32), np.zeros((N, E, T), np.float32)
    probs, zs, texts = np.zeros((N, E, T, 2), np.float32), [], []
    inv_t = 1.0 / jnp.asarray(temps, jnp.float32)
    per_chunk = max(1, min(N, cfg.chunk // E))
    for t in range(T):
        batch = [prompt.text(m, chat, T, actions[n, e, :t], rewards[n, e, :t]) for n in range(N) for e in range(E)]
        texts.append(batch[:E])
        tok, mask = _pad(*m.tokenize(batch))
        tok, mask = (jnp.asarray(x).reshape(N, E, -1) for x in (tok, mask))
        logits, z = _step(m, tok, mask, jnp.asarray(vectors), jnp.asarray(scales), ids, layers, per_chunk)
        p = jax.nn.softmax(logits.astype(jnp.float32) * inv_t[:, None, None], -1)
        key, sub = jax.random.split(key)
        draw = jax.random.uniform(sub, (E,))  # shared by the conditions (common random numbers)
        a = (draw[None] < p[..., 1]).astype(jnp.int32)
        actions[:, :, t] = np.asarray(a)
        rewards[:, :, t] = np.asarray(jax.vmap(bandit.pull, (None, 0, None))(env, a, t))
        probs[:, :, t] = np.asarray(p)
        zs.append(np.asarray(z))
    return dict(probs=probs, actions=actions, rewards=rewards, z=np.stack(zs, -2), texts=texts)


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
    """`(names, kinds, betas, temps, vectors [N, L, D], scales [N, L])` of the evaluation."""
    rows = [("unsteered", "unsteered", main, 0.0, 1.0, "east")]
    rows += [(f"EAST L{l} beta {b:g}", f"EAST L{l}", l, b, 1.0, "east") for l in layers for b in cfg.betas]
    rows += [(f"{k} L{main} beta {b:g}", k, main, b, 1.0, k) for k in ("random", "shuffled", "step") for b in cfg.betas]
    rows += [(f"temperature {t:g}", "temperature", main, 0.0, t, "east") for t in cfg.temperatures]
    vectors, scales = np.zeros((len(rows), L, D), np.float32), np.zeros((len(rows), L), np.float32)
    for n, (_, _, l, b, _, k) in enumerate(rows):
        vectors[n, l] = vecs[l][k]
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

    fig = Figure(figsize=(14, 4))
    panels = (("final_entropy", f"entropy, last {cfg.window} steps"), ("tried_both", f"tried both arms in first {cfg.first_k}"),
              ("regret", f"cumulative regret after {T} steps"))
    for j, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 4, j + 1)
        for kind in [f"EAST L{l}" for l in layers] + ["random", "shuffled", "step"]:
            ys = [summ[0][key]] + [summ[i][key] for i, k in enumerate(kinds) if k == kind]
            ax.plot([0, *cfg.betas], ys, "-o" if kind.startswith("EAST") else ":s", ms=3, label=kind)
        ys = [summ[0][key]] + [summ[i][key] for i, k in enumerate(kinds) if k == "temperature"]
        ax2 = ax.twiny()
        ax2.plot([1, *cfg.temperatures], ys, "k--^", ms=4, label="temperature (top axis)")
        ax2.set_xlabel("sampling temperature (black dashed)")
        ax.set(xlabel="beta (x mean residual norm)", ylabel=label)
        if j == 0:
            ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 4, 4)
    if sampled:
        x = np.arange(len(sampled))
        ax.bar(x - 0.2, [s["valid_rate"] for s in sampled], 0.4, label="valid rate")
        ax.bar(x + 0.2, [s["entropy"] for s in sampled], 0.4, label="entropy of parsed actions")
        ax.set_xticks(x, [s["condition"] for s in sampled], rotation=20, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    ax.set(title="sampled mode (entropy in nats; NaN: no valid completion)", ylim=(0, 1))
    fig.suptitle(f"{tag}: n = {cfg.n_episodes} episodes per condition")
    save_figure(fig, out / "east_sweep.png")


def study(m, cfg: Config, chat: bool, tag: str, out) -> tuple[list, dict]:
    """The whole study for one agent (figures into the folder `out`): report sections and metrics."""
    L, D = m.cfg.n_layers, m.cfg.d_model
    layers = validate(cfg, L)
    main = layers[len(layers) // 2]
    key = jax.random.PRNGKey(cfg.seed)
    k_col, k_env, k_act, k_dir, k_tr, k_s = jax.random.split(key, 6)
    prompt = Prompt()
    zero = (np.zeros((1, L, D), np.float32), np.zeros((1, L), np.float32), np.ones(1, np.float32))
    col_env = bandit.make_bandits(k_col, cfg.n_collect, cfg.steps, cfg.gap, cfg.sigma)
    col = run_episodes(m, cfg, prompt, col_env, *zero, jax.random.fold_in(k_act, 0), layers, chat)
    vecs = build_vectors(col, layers, cfg, L, D, k_dir)
    names, kinds, betas, temps, vectors, scales = conditions(vecs, layers, main, cfg, L, D)
    env = bandit.make_bandits(k_env, cfg.n_episodes, cfg.steps, cfg.gap, cfg.sigma)
    res = run_episodes(m, cfg, prompt, env, vectors, scales, np.asarray(temps, np.float32), k_act, (main,), chat)
    summ = summarise(res, env, cfg)
    tr_rows = [0] + [names.index(f"EAST L{main} beta {b:g}") for b in cfg.betas]
    res_tr = run_episodes(m, cfg, REWORDED, env, vectors[tr_rows], scales[tr_rows], np.ones(len(tr_rows), np.float32),
                          k_act, (main,), chat)
    transfer = summarise(res_tr, env, cfg)
    sampled = sampled_mode(m, cfg, col, vecs, main, chat, k_s)
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
    base = summ[0]["final_entropy"]
    best = max(cfg.betas)
    east = summ[names.index(f"EAST L{main} beta {best:g}")]["final_entropy"]
    ctrl = {k: summ[names.index(f"{k} L{main} beta {best:g}")]["final_entropy"] for k in ("random", "shuffled", "step")}
    sem = summ[0]["final_entropy_sem"]
    sem_ok = sem if np.isfinite(sem) else 0.0
    verdict = (f"Unsteered, the mean policy entropy goes from {summ[0]['entropy_per_step'][0]:.3f} at step 1 to {summ[0]['entropy_per_step'][-1]:.3f} "
               f"nats at step {cfg.steps} (max ln 2 = 0.693). Final-window entropy: unsteered {base:.3f} (sem {fmt(sem, '.3f')}); "
               f"EAST at layer {main}, beta {best:g}: {east:.3f}; same-norm controls: random {ctrl['random']:.3f}, "
               f"entropy-shuffled {ctrl['shuffled']:.3f}, step-index {ctrl['step']:.3f}. " +
               ("EAST raises the final-window entropy by more than every control and by more than 2 sem of the unsteered "
                "run." if east - base > 2 * sem_ok and east > max(ctrl.values()) else
                "**EAST does not raise the final-window entropy beyond its controls** on this model (see the table).") +
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
                          "scaled to the same added norm beta x mean |z|.\n\n" + vec_text),
        (f"{tag}: entropy vs beta vs temperature", table + "\n" + verdict + "\n\n![entropy per step](east_entropy_per_step.png)\n"
                                                   "![sweep](east_sweep.png)"),
        (f"{tag}: transfer to a reworded prompt", "The vectors from the A / B prompt, applied to a prompt with other wording "
                                                  "and buttons red / blue (same bandits):\n\n" + tr_table
                                                  + f"\n\nUnsteered {transfer[0]['final_entropy']:.3f} -> EAST beta {best:g} "
                                                  f"{transfer[-1]['final_entropy']:.3f} on the reworded prompt, against "
                                                  f"{base:.3f} -> {east:.3f} on the original."),
        (f"{tag}: sampled mode", (f"{min(cfg.sampled_prompts, cfg.n_collect * cfg.steps)} collection prompts x "
                                  f"{cfg.samples} completions of {cfg.max_new_tokens} tokens after \"Thought:\", action "
                                  "parsed from \"Action: <button>\", invalid completions dropped:\n\n" + s_table +
                                  "\n\nExample: " + repr(sampled[0]["example"])) if sampled else "skipped (--sampled-prompts 0)"),
    ]
    metrics = dict(layers=list(layers), main_layer=main, conditions=dict(zip(names, summ)),
                   transfer={names[r]: s for r, s in zip(tr_rows, transfer)}, sampled=sampled,
                   vectors={str(l): {k: v[k] for k in ("u_norm", "z_norm", "cos_step", "cos_shuffled")} for l, v in vecs.items()},
                   collection_entropy_per_step=h_col.mean(0).tolist())
    return sections, metrics


def main(argv=None, cfg: Config | None = None):
    cfg = cfg or parse_config(Config, argv, __doc__)
    out = run_dir("east", cfg.out)
    agents = [(cfg.model, cfg.chat)] + ([(cfg.second_model, False)] if cfg.second_model else [])
    sections, metrics = [], {}
    for i, (name, chat) in enumerate(agents):
        m = models.load(name)
        sub = out if i == 0 else out / "second_agent"
        sub.mkdir(exist_ok=True)
        s, met = study(m, cfg, chat, name, sub)
        if i:
            s = [(h, b.replace("](east_", "](second_agent/east_")) for h, b in s]
        sections += s
        metrics[name] = met
    report = write_report(out, "Entropic activation steering of an LLM bandit agent (Rahn et al. 2024)", cfg, sections,
                          undefined_to_none(metrics))
    print(f"wrote {report}")
    return out, metrics


if __name__ == "__main__":
    main()
