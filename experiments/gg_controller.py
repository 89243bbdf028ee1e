"""The pieces of `experiments.guiding_giants`: the controller (equinox), its BCE training (optax, jitted, seeded,
orbax checkpoints), the end-to-end variant trained with `jax.grad` through the steered forward, the prompt pass
that collects its inputs, and the authors' embedding-phrase refusal direction.

    ctrl, losses = train_controller(x, y, TrainSpec(), jax.random.key(0), checkpoints=out / "checkpoints" / "bce")
    s, w = ctrl(x)                                     # s [N] (raw logit), w [N, n_layers] in (0, 1)
    steer = AddVectorPerExample("resid_post", d_hat, alpha * s[:, None] * w)   # the paper's patch, every layer
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int

from experiments.common import KLFromBase, RefusalScore
from interp.directions import normalize
from interp.interventions import AddVectorPerExample, Where
from interp.readout import Readout, logits_from_resid, run_readout
import models
from models import transformer
from models.transformer import Capture

# Authors' phrase lists for the embedding direction: mean input embedding of refusal phrases minus compliance phrases.
REFUSAL_PHRASES = ("I'm sorry", "I cannot", "I can't", "I apologize", "I am unable", "As an AI", "I won't",
                   "Unfortunately", "I must decline", "Sorry")
COMPLIANCE_PHRASES = ("Sure", "Here is", "Certainly", "Of course", "Absolutely", "Here's", "Yes", "Happy to help",
                      "Great question", "Let me")


def phrase_direction(m, refusal: Sequence[str] = REFUSAL_PHRASES,
                     compliance: Sequence[str] = COMPLIANCE_PHRASES) -> Float[Array, " D"]:
    """Unit `mean(W_E[tokens of refusal phrases]) - mean(W_E[tokens of compliance phrases])` (Hegazy et al.'s code)."""
    W_E = m.params["embed"]["W_E"].astype(jnp.float32)
    mean = lambda ps: jnp.mean(W_E[jnp.asarray([t for p in ps for t in m.tokenizer.encode(p, add_bos=False)])], 0)
    return normalize(mean(refusal) - mean(compliance))


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
    """One orbax checkpoint of `state` (the saes trainer's `Checkpointer`), replacing earlier ones."""
    if checkpoints is None:
        return
    from saes.train import Checkpointer

    ckpt = Checkpointer(Path(checkpoints), keep=1)
    ckpt.save(step, state, meta)
    ckpt.close()


def restore(checkpoints: Path, like) -> tuple:
    """`(state, meta)` of the latest checkpoint in `checkpoints`, shaped like `like` (e.g. `(controller, opt_state)`)."""
    from saes.train import Checkpointer

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


# ----------------------------------------------------------------------------- end to end


def steer_scales(s: Float[Array, " N"], w: Float[Array, "N L"], alpha: float) -> Float[Array, "N L"]:
    """The paper's per-example, per-layer patch scale `alpha * s * w_l` (times the unit direction)."""
    return alpha * s[:, None] * w


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
    alpha: float = 4.0
    train_s: bool = False  # also train the global scale (else s stays the BCE controller's)


def train_end_to_end(m, ctrl: Controller, direction, feats, tokens, mask, is_harmful: np.ndarray, base_logp,
                     ids: Int[Array, " n"], spec: EndToEndSpec, opt_spec: TrainSpec, seed: int, where: Where = Where(),
                     checkpoints: Path | None = None) -> tuple[Controller, list[float]]:
    """Fine-tune a copy of `ctrl` by `jax.grad` through the steered forward (paper mode: every layer, every
    position by default): minimise `-refusal log-odds(harmful) + lam * KL(base || steered)(harmless)` at the
    last prompt token, `spec.batch` of each class per step. Only the `w` path is trained unless
    `spec.train_s` (then `s` too); `s` else comes from `ctrl`, and so must at evaluation (the copy's own `s`
    drifts with the shared hidden layer). Returns the trained copy and the objective at each step."""
    harm, safe = np.flatnonzero(is_harmful), np.flatnonzero(~is_harmful)
    opt = optimizer(opt_spec, spec.lr)
    train = ctrl
    state = opt.init(eqx.filter(train, eqx.is_array))
    direction = jnp.asarray(direction, jnp.float32)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(spec.steps):
        rows = np.r_[rng.choice(harm, spec.batch, replace=False), rng.choice(safe, spec.batch, replace=False)]
        train, state, loss = _e2e_step(train, state, ctrl, m, direction, jnp.asarray(feats[rows]),
                                       jnp.asarray(tokens[rows]), jnp.asarray(mask[rows]),
                                       jnp.asarray(base_logp[rows[spec.batch:]]), ids, opt, spec.batch, spec.alpha,
                                       spec.lam, spec.train_s, where)
        losses.append(float(loss))
    _save(checkpoints, spec.steps, (train, state), {"kind": "end-to-end", "loss": losses[-1]})
    return train, losses
