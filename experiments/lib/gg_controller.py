"""The pieces of `experiments.guiding_giants`: the authors' embedding-phrase refusal direction (their lists, and
the old ones as a named variant), the token-push control, per-layer residual norms, the controller (equinox), its
BCE training (optax, jitted, seeded, orbax checkpoints), the prompt pass that collects its inputs, per-step
steering with the controller re-run at every decoding step (the authors' `SteeringModifier`), and the end-to-end
variant trained with `jax.grad` through the steered forward.

    ctrl, losses = train_controller(x, y, TrainSpec(), jax.random.key(0), checkpoints=out / "checkpoints" / "bce")
    s, w = ctrl(x)                                     # s [N] (raw logit), w [N, n_layers] in (0, 1)
    steer = AddVectorPerExample("resid_post", d_hat, coef * s[:, None] * w)   # the paper's patch, every layer
    new, scales = per_step_tokens(m, tokens, mask, StepSteer(ctrl, coef, bias, gate), d_hat, stops,
                                  layers=(L - 4, L - 3, L - 2, L - 1), max_new_tokens=48)   # the authors' mode
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from experiments.lib.refusal_metrics import KLFromBase, RefusalScore
from interp.directions import normalize
from interp.interventions import AddVectorPerExample, Where
from interp.readout import Readout, logits_from_resid, run_readout
import models
from models import transformer
from models.checkpoints import Checkpointer
from models.generate import empty_cache
from models.transformer import Capture

# The authors' phrase lists (GuidingGiantsWAS, `configs/paper_reproduction.yaml`, read by
# `llmsteering/utils/activation.py::get_refusal_direction`): d = mean(E[refusal tokens]) - mean(E[answer tokens]),
# every token of every phrase pooled. "I" sits on both sides and cancels.
AUTHORS_REFUSAL = ("I apologize", "I'm sorry", "I cannot", "I can't", "I am unable", "I'm not able", "I am not able",
                   "I don't", "I do not", "against my", "ethical guidelines", "programmed to", "designed to")
AUTHORS_ANSWER = ("Sure", "Here", "I'll", "I will", "I'd be happy", "I would be happy", "I can help", "Of course",
                  "Certainly", "Here's", "Here is")
# The lists this study used before (issue 40), kept as a named variant. Caveat: "I" is on the refusal side only
# (7 of 24 refusal tokens, none of the 18 compliance tokens), so on SmolLM2 the direction is mostly the token "I"
# (cosine 0.55 with its embedding; "I" is the top token of the tied unembedding of the direction).
CODE_REFUSAL = ("I'm sorry", "I cannot", "I can't", "I apologize", "I am unable", "As an AI", "I won't",
                "Unfortunately", "I must decline", "Sorry")
CODE_COMPLIANCE = ("Sure", "Here is", "Certainly", "Of course", "Absolutely", "Here's", "Yes", "Happy to help",
                   "Great question", "Let me")
PHRASE_LISTS = {"authors": (AUTHORS_REFUSAL, AUTHORS_ANSWER), "old-lists": (CODE_REFUSAL, CODE_COMPLIANCE)}


def phrase_direction(m, refusal: Sequence[str] = AUTHORS_REFUSAL,
                     compliance: Sequence[str] = AUTHORS_ANSWER) -> Float[Array, " D"]:
    """Unit `mean(W_E[tokens of refusal phrases]) - mean(W_E[tokens of compliance phrases])` (Hegazy et al.'s code)."""
    W_E = m.params["embed"]["W_E"].astype(jnp.float32)
    mean = lambda ps: jnp.mean(W_E[jnp.asarray([t for p in ps for t in m.tokenizer.encode(p, add_bos=False)])], 0)
    return normalize(mean(refusal) - mean(compliance))


def top_pushed_token(m, direction) -> int:
    """The token whose logit the direction pushes most: argmax of the unembedding of `direction` (`W_U^T d`; tied
    to the embedding on SmolLM2)."""
    return int(jnp.argmax(transformer.unembed(m.params, jnp.asarray(direction, jnp.float32)[None], m.cfg)[0]))


def token_direction(m, token: int) -> Float[Array, " D"]:
    """The unit input-embedding row of `token` (the token-push control: a direction that pushes one logit)."""
    return normalize(m.params["embed"]["W_E"][token].astype(jnp.float32))


@eqx.filter_jit
def _norm_pass(model, tokens, mask):
    _, acts = models.forward(model, tokens, mask, None, (Capture("resid_post"),))
    r = acts["resid_post"].astype(jnp.float32)  # [L, B, T, D]
    real = mask.astype(jnp.float32) * (jnp.cumsum(mask, 1) > 1)  # real tokens after each row's first
    n = jnp.linalg.norm(r, axis=-1)  # [L, B, T]
    last = n[:, :, -1]  # left padding: the last column is each row's last real token
    return jnp.sum(n * real, (1, 2)), jnp.sum(real), jnp.sum(last, 1)


def layer_norms(m, tokens, mask, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean `resid_post` norm per layer `[L]` over the real tokens after each row's first (the first is an attention
    sink with an outsized norm), and over each row's last token `[L]`; `tokens` left-padded."""
    tot, cnt, last = 0.0, 0.0, 0.0
    for lo in range(0, len(tokens), batch_size):
        s, c, la = _norm_pass(m, jnp.asarray(tokens[lo:lo + batch_size]), jnp.asarray(mask[lo:lo + batch_size]))
        tot, cnt, last = tot + np.asarray(s), cnt + float(c), last + np.asarray(la)
    return tot / cnt, last / len(tokens)


# ----------------------------------------------------------------------------- the controller


class Controller(eqx.Module):
    """`Linear(k*D -> hidden) -> ReLU -> Linear(hidden -> 1 + n_layers)` on the concatenated last-`k`-layer
    residuals; output 0 is the global scale `s` (a raw logit, used as is), outputs 1.. give `w_l = sigmoid`."""

    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, d_in: int, n_hidden: int, n_layers: int, key):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(d_in, n_hidden, key=k1)
        self.out = eqx.nn.Linear(n_hidden, 1 + n_layers, key=k2)

    def __call__(self, x: Float[Array, "N d"]) -> tuple[Float[Array, " N"], Float[Array, "N L"]]:
        z = jax.vmap(lambda v: self.out(jax.nn.relu(self.hidden(v))))(x)
        return z[:, 0], jax.nn.sigmoid(z[:, 1:])


@dataclass(frozen=True)
class TrainSpec:
    """The authors' training: AdamW, batch 8, 10 epochs, gradient clipping 1.0, regulariser weight 0.1."""

    n_hidden: int = 1024
    lr: float = 5e-5
    weight_decay: float = 0.01
    batch: int = 8
    epochs: int = 10
    clip: float = 1.0
    reg: float = 0.1


def bce_loss(ctrl: Controller, x, y, reg: float) -> Array:
    """BCE-with-logits of `s` against `y` (harmful = 1) plus, on the harmful rows only,
    `reg * (mean_l |w_l - 0.5| + 0.01 * mean_l w_l)`: the only term that reaches the layer weights."""
    s, w = ctrl(x)
    r = jnp.mean(jnp.abs(w - 0.5), -1) + 0.01 * jnp.mean(w, -1)
    return jnp.mean(optax.sigmoid_binary_cross_entropy(s, y)) + reg * jnp.sum(r * y) / jnp.maximum(jnp.sum(y), 1.0)


@lru_cache(maxsize=None)
def optimizer(spec: TrainSpec, lr: float | None = None):
    """One optimiser object per setting (a static argument of the jitted steps: the same object reuses their compilation)."""
    return optax.chain(optax.clip_by_global_norm(spec.clip), optax.adamw(spec.lr if lr is None else lr,
                                                                         weight_decay=spec.weight_decay))


def _save(checkpoints: Path | None, step: int, state, meta: dict) -> None:
    """One orbax checkpoint of `state` (`models.checkpoints.Checkpointer`, as the SAE trainer's), replacing earlier ones."""
    if checkpoints is None:
        return
    ckpt = Checkpointer(Path(checkpoints), keep=1)
    ckpt.save(step, state, meta)
    ckpt.close()


def restore(checkpoints: Path, like) -> tuple:
    """`(state, meta)` of the latest checkpoint in `checkpoints`, shaped like `like` (e.g. `(controller, opt_state)`)."""
    ckpt = Checkpointer(Path(checkpoints), keep=1)
    try:
        return ckpt.restore(like)
    finally:
        ckpt.close()


def train_controller(x: Float[np.ndarray, "N d"], y: Float[np.ndarray, " N"], n_layers: int, spec: TrainSpec, key,
                     checkpoints: Path | None = None) -> tuple[Controller, list[float]]:
    """The controller trained with `bce_loss` (rows reshuffled every epoch from `key`, full batches only), one
    jitted optax step per batch; checkpointed (controller, optimiser state) after the last epoch. Returns it and
    the mean loss of each epoch."""
    k_init, k_data = jax.random.split(key)
    ctrl = Controller(x.shape[1], spec.n_hidden, n_layers, k_init)
    opt = optimizer(spec)
    state = opt.init(eqx.filter(ctrl, eqx.is_array))

    @eqx.filter_jit
    def step(ctrl, state, xb, yb):
        loss, g = eqx.filter_value_and_grad(bce_loss)(ctrl, xb, yb, spec.reg)
        updates, state = opt.update(g, state, eqx.filter(ctrl, eqx.is_array))
        return eqx.apply_updates(ctrl, updates), state, loss

    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    n_batches = len(x) // spec.batch
    losses, steps = [], 0
    for k in jax.random.split(k_data, spec.epochs):
        perm = jax.random.permutation(k, len(x))
        epoch = []
        for b in range(n_batches):
            rows = perm[b * spec.batch:(b + 1) * spec.batch]
            ctrl, state, loss = step(ctrl, state, x[rows], y[rows])
            epoch.append(float(loss))
            steps += 1
        losses.append(float(np.mean(epoch)))
    _save(checkpoints, steps, (ctrl, state), {"kind": "bce", "epochs": spec.epochs, "loss": losses[-1]})
    return ctrl, losses


# ----------------------------------------------------------------------------- the prompt pass


@eqx.filter_jit
def _prompt_pass(model, tokens, mask, interventions, layers: tuple[int, ...]):
    caps = (Capture("resid_post", layers=layers, positions=(-1,)), Capture("final_norm", positions=(-1,)))
    _, acts = models.forward(model, tokens, mask, None, caps, interventions)
    logits = transformer.unembed(model.params, acts["final_norm"][:, 0], model.cfg)
    feats = jnp.moveaxis(acts["resid_post"][:, :, 0], 0, 1)  # [B, k, D]
    return feats.reshape(feats.shape[0], -1), jax.nn.log_softmax(logits.astype(jnp.float32), -1)


def prompt_pass(m, tokens, mask, n_feature_layers: int, batch_size: int, steer=None):
    """Controller inputs (`resid_post` of the last `n_feature_layers` layers at the last prompt token,
    concatenated: `[N, k*D]`) and next-token log-probs at that token `[N, V]`, in chunks of `batch_size` rows
    (the last one padded, so one compiled program serves every chunk). `steer(rows) -> interventions` steers
    the pass (rows: the chunk's row indices)."""
    L, N = m.cfg.n_layers, len(tokens)
    layers = tuple(range(L - n_feature_layers, L))
    feats, logps = [], []
    for lo in range(0, N, batch_size):
        rows = np.arange(lo, lo + batch_size) % N  # the last chunk wraps round to full size
        ivs = () if steer is None else tuple(steer(rows))
        f, lp = _prompt_pass(m, jnp.asarray(tokens[rows]), jnp.asarray(mask[rows]), ivs, layers)
        keep = min(batch_size, N - lo)
        feats.append(np.asarray(f[:keep]))
        logps.append(np.asarray(lp[:keep]))
    return np.concatenate(feats), np.concatenate(logps)


def last_layer_logp(m, last_resid: Float[Array, "N D"], scale: Float[Array, " N"], direction) -> Float[Array, "N V"]:
    """Next-token log-probs at the last prompt token with `scale * direction` added to the last layer's
    `resid_post` there (the authors' mode on the prompt pass), exactly, from the unsteered residual: no forward."""
    r = jnp.asarray(last_resid, jnp.float32) + jnp.asarray(scale, jnp.float32)[:, None] * jnp.asarray(direction)
    return jax.nn.log_softmax(logits_from_resid(m.params, m.cfg, r), -1)


# ----------------------------------------------------------------------------- per-step steering (authors' mode)


class StepSteer(eqx.Module):
    """What the authors' `SteeringModifier` adds at each forward in their mode, per row: the controller reads the
    newest token's `resid_post` at its input layers (the last k) and the last layer's `resid_post` there gets
    `(bias + coef * g(s) * w_{L-1}) * direction`, g(s) = max(s, 0) where `gate` else s. `bias` alone (coef 0) is
    a fixed per-prompt scale: the constant control and the once-per-prompt ablation. Rows `[B]`."""

    ctrl: Controller
    coef: Float[Array, " B"]
    bias: Float[Array, " B"]
    gate: Float[Array, " B"]  # 1: gate-only, g(s) = max(s, 0); 0: g(s) = s

    def scale(self, feats: Float[Array, "B kD"]) -> Float[Array, " B"]:
        s, w = self.ctrl(feats)
        s = jnp.where(self.gate > 0, jnp.maximum(s, 0.0), s)
        return self.bias + self.coef * s * w[:, -1]


def _steered_next(params, cfg, acts, steer: StepSteer, direction):
    feats = jnp.moveaxis(acts["resid_post"][:, :, 0], 0, 1).astype(jnp.float32)  # [B, k, D]
    c = steer.scale(feats.reshape(feats.shape[0], -1))
    d = direction if direction.ndim == 2 else direction[None]
    logits = logits_from_resid(params, cfg, feats[:, -1] + c[:, None] * d)
    return jnp.argmax(logits, -1).astype(jnp.int32), c


@partial(jax.jit, static_argnames=("layers", "max_new_tokens"))
def per_step_tokens(model, tokens, mask, steer: StepSteer, direction, stop_ids, *, layers: tuple[int, ...],
                    max_new_tokens: int):
    """Greedy new tokens `[B, n]` and the scale used at each step `[B, n]` with the controller re-run at every
    forward (prompt pass, then each generated token) on the newest token's `resid_post` at `layers` (which end
    with the last layer), its push added to the last layer's `resid_post` there. The last layer's output feeds
    no later key or value, so the KV cache is the unsteered model's and the push changes only the next-token
    logits. After a stop token a row repeats it (`models.generate_tokens`). `direction` `[D]` or `[B, D]`."""
    params, cfg = model.params, model.cfg
    B, T = tokens.shape
    cache = empty_cache(cfg, B, T + max_new_tokens)
    cap = (Capture("resid_post", layers=layers, seq_indices=(-1,)),)
    (_, acts), cache = transformer.forward_cached(params, cfg, tokens, mask, None, cap, (), cache=cache, step=0)
    first, c0 = _steered_next(params, cfg, acts, steer, direction)
    next_pos = jnp.sum(mask, 1).astype(jnp.int32)
    out = jnp.zeros((B, max_new_tokens), jnp.int32).at[:, 0].set(first)
    scales = jnp.zeros((B, max_new_tokens), jnp.float32).at[:, 0].set(c0)
    done = jnp.isin(first, stop_ids)

    def cond(state):
        return (state[0] < max_new_tokens) & ~jnp.all(state[3])

    def body(state):
        i, cache, last, done, out, scales = state
        pos = (next_pos + i - 1)[:, None]
        (_, acts), cache = transformer.forward_cached(params, cfg, last[:, None], jnp.ones((B, 1), jnp.int32), pos,
                                                      cap, (), cache=cache, step=i)
        tok, c = _steered_next(params, cfg, acts, steer, direction)
        tok = jnp.where(done, last, tok)
        done = done | jnp.isin(tok, stop_ids)
        return i + 1, cache, tok, done, out.at[:, i].set(tok), scales.at[:, i].set(c)

    _, _, _, _, out, scales = jax.lax.while_loop(cond, body, (jnp.asarray(1), cache, first, done, out, scales))
    return out, scales


def decode_rows(m, new: np.ndarray, stop_ids: Sequence[int]) -> list[str]:
    """Each row of new tokens cut at its first stop token and decoded (as `models.generate` does)."""
    stops = set(int(t) for t in stop_ids)
    rows = []
    for row in np.asarray(new):
        cut = next((i for i, t in enumerate(row) if int(t) in stops), len(row))
        rows.append(m.decode([int(t) for t in row[:cut]]))
    return rows


# ----------------------------------------------------------------------------- end to end


def steer_scales(s: Float[Array, " N"], w: Float[Array, "N L"], coef) -> Float[Array, "N L"]:
    """The paper's per-example, per-layer patch scale `coef_l * s * w_l` (times the unit direction); `coef` a
    number (the paper's alpha) or per layer `[L]` (a strength in units of each layer's residual norm)."""
    return jnp.asarray(coef, jnp.float32) * s[:, None] * w


def _e2e_loss(train: Controller, frozen: Controller, m, direction, x, tokens, mask, base_logp, ids, n_harm: int,
              alpha: float, lam: float, train_s: bool, where: Where):
    s = (train if train_s else frozen)(x)[0]
    iv = AddVectorPerExample("resid_post", direction, steer_scales(s, train(x)[1], alpha), where=where)
    r = run_readout(m, tokens, mask, (iv,))
    harm = Readout(r.logits[:n_harm], r.resid[:n_harm])
    safe = Readout(r.logits[n_harm:], r.resid[n_harm:])
    return -RefusalScore(ids)(harm) + lam * KLFromBase(base_logp)(safe)


@eqx.filter_jit
def _e2e_step(train, state, frozen, m, direction, x, tokens, mask, base_logp, ids, opt, n_harm, alpha, lam, train_s,
              where):
    loss, g = eqx.filter_value_and_grad(_e2e_loss)(train, frozen, m, direction, x, tokens, mask, base_logp, ids,
                                                   n_harm, alpha, lam, train_s, where)
    updates, state = opt.update(g, state, eqx.filter(train, eqx.is_array))
    return eqx.apply_updates(train, updates), state, loss


@dataclass(frozen=True)
class EndToEndSpec:
    steps: int = 16
    batch: int = 8  # harmful and as many harmless prompts per step
    lr: float = 1e-3
    lam: float = 1.0  # weight of the KL on harmless prompts
    train_s: bool = False  # also train the global scale (else s stays the BCE controller's)


def train_end_to_end(m, ctrl: Controller, direction, feats, tokens, mask, is_harmful: np.ndarray, base_logp,
                     ids: Int[Array, " n"], spec: EndToEndSpec, opt_spec: TrainSpec, seed: int, coef,
                     where: Where = Where(), checkpoints: Path | None = None) -> tuple[Controller, list[float]]:
    """Fine-tune a copy of `ctrl` by `jax.grad` through the steered forward at the patch scale `coef * s * w_l`
    (`coef` per layer `[L]` or a number: train at the strength it is judged at; paper mode: every layer, every
    position by default): minimise `-refusal log-odds(harmful) + lam * KL(base || steered)(harmless)` at the
    last prompt token, `spec.batch` of each class per step. Only the `w` path is trained unless
    `spec.train_s` (then `s` too); `s` else comes from `ctrl`, and so must at evaluation (the copy's own `s`
    drifts with the shared hidden layer). Returns the trained copy and the objective at each step."""
    harm, safe = np.flatnonzero(is_harmful), np.flatnonzero(~is_harmful)
    opt = optimizer(opt_spec, spec.lr)
    train = ctrl
    state = opt.init(eqx.filter(train, eqx.is_array))
    direction = jnp.asarray(direction, jnp.float32)
    coef = jnp.asarray(coef, jnp.float32)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(spec.steps):
        rows = np.r_[rng.choice(harm, spec.batch, replace=False), rng.choice(safe, spec.batch, replace=False)]
        train, state, loss = _e2e_step(train, state, ctrl, m, direction, jnp.asarray(feats[rows]),
                                       jnp.asarray(tokens[rows]), jnp.asarray(mask[rows]),
                                       jnp.asarray(base_logp[rows[spec.batch:]]), ids, opt, spec.batch, coef,
                                       spec.lam, spec.train_s, where)
        losses.append(float(loss))
    _save(checkpoints, spec.steps, (train, state), {"kind": "end-to-end", "loss": losses[-1]})
    return train, losses
