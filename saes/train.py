"""Train SAE dictionaries: one jitted step for all hooks, mesh sharding, metrics, exact resume, a report.

    python -m saes.train --model smollm2-135m-instruct --site resid_post --layers 10,15 --arch topk --k 32 \\
        --width 8192 --tokens 2_000_000

or from Python:

    cfg = saes.TrainConfig(site=("resid_post",), layers=(10, 15), arch="topk", k=32, width=8192, tokens=2_000_000)
    result = saes.fit(cfg)               # result.saes: {"L10.resid_post": SAE, ...}

Every hook gets its own SAE; all of them are trained by ONE jitted step on the same token batch (one
optimizer over the dict of SAEs). Optimisation: optax Adam with linear warm-up and a linear decay over the
last `lr_decay_frac` of the steps, a sparsity-coefficient warm-up over the first `sparsity_warmup_frac`,
global-norm gradient clipping; unit-norm decoders (TopK/BatchTopK/JumpReLU) have the gradient's radial
component projected out and rows renormalised after each step.

Sharding: with `data_parallel * feature_parallel` devices, a `("data", "model")` mesh splits each batch over
`data` and every SAE's dictionary over `model` (`W_enc` columns, `W_dec` rows, per-feature vectors and
their Adam moments), following `models.sharding.RULES` ("batch" -> data, "features" -> model). The same
config runs on one CPU or a mesh.

Outputs under `out/`: `config.json`, `metrics.jsonl` (one line per `log_every` steps and per evaluation),
`checkpoints/` (orbax: SAE params, optimizer state, feature statistics, step; with the data-stream
position and seed as JSON), `saes/<hook>/` (our format), `report.json` and `training_curves.png`. A run
restarted with the same `out` resumes from its newest valid checkpoint and ends with bit-identical weights:
each checkpoint stores a SHA-256 of its contents, verified on restore; one that does not restore or verify is
reported, moved to `checkpoints.damaged/` and the previous one is used. Rerunning a finished run is a no-op.
A non-finite loss or parameter stops training with `TrainingDiverged`, naming the step; checkpoints are
only written from finite states, so the last one is good. The config is validated when it is built
(`TrainConfig.__post_init__`, every flag) and against the model as soon as it is known (`validate`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from models import cli
from models.errors import InputError
from saes import sae as sae_lib
from saes.sae import SAE

__all__ = ["CheckpointCorrupt", "TrainConfig", "TrainResult", "TrainState", "TrainingDiverged", "main", "train",
           "validate"]

DEFAULT_SPARSITY = {"relu": 5.0, "gated": 2.0, "jumprelu": 1.0, "topk": 0.0, "batchtopk": 0.0}


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss or parameter."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run (the CLI's flags are these fields)."""

    # what to train
    model: str = "smollm2-135m-instruct"  # registered name (models.REGISTRY), .gguf file or Hugging Face directory
    site: tuple[str, ...] = ("resid_post",)  # activation sites (models.SITES), one SAE per site x layer
    layers: tuple[int, ...] = (10,)  # layers of the layer sites
    arch: str = "topk"  # relu, topk, batchtopk, jumprelu or gated
    width: int = 8192  # dictionary size (latents per SAE)
    k: int = 32  # active latents per token (topk, batchtopk)
    sparsity_coeff: float | None = None  # L1 (relu, gated) or L0 (jumprelu); None = the arch's default
    # data
    corpus: str | None = None  # a text/jsonl/parquet file or directory, or a saved HF dataset; None = default corpus
    text_field: str = "text"  # the text column of .jsonl / .parquet / dataset corpora
    context: int = 128  # tokens per packed row (BOS + context-1 text tokens)
    model_batch: int = 16  # rows per model forward
    chunk_tokens: int = 65536  # activations per shuffled on-device buffer
    cache: str | None = None  # train from this activation cache (written by `python -m saes.cache`)
    tokens: int = 2_000_000  # training tokens (at least one batch); steps = tokens // batch_size
    batch_size: int = 4096  # activations per SAE step (at most chunk_tokens)
    normalize: bool = True  # scale activations to mean norm sqrt(d_in); the factor is stored with the SAE
    b_dec_init: str = "geometric_median"  # or "mean", "zeros"
    # optimisation
    lr: float = 4e-4  # Adam learning rate after warm-up
    lr_warmup_steps: int = 50  # linear learning-rate warm-up
    lr_decay_frac: float = 0.2  # linear decay to 0 over this last fraction of the steps
    sparsity_warmup_frac: float = 0.05  # sparsity coefficient rises linearly over this first fraction
    beta1: float = 0.9  # Adam beta1
    beta2: float = 0.999  # Adam beta2
    grad_clip: float = 1.0  # global gradient-norm clip
    aux_coeff: float = 1 / 32  # AuxK (topk, batchtopk)
    aux_k: int = 0  # 0 = d_in // 2
    aux_batch: int = 1024  # AuxK on this many tokens of each (shuffled) batch; 0 = all
    dead_tokens: int = 1_000_000  # a latent is dead after this many tokens without firing
    dense_freq: float = 0.1  # a latent is dense when it fires on more than this fraction of tokens
    freq_window_steps: int = 100  # horizon of the firing-frequency moving average
    bandwidth: float = 0.05  # JumpReLU STE
    threshold_init: float = 0.01  # JumpReLU
    threshold_lr: float = 0.01  # BatchTopK inference-threshold moving average
    decoder_init_norm: float | None = None  # initial decoder row norm; None = 1 (unit-norm archs) or 0.1
    # runtime
    seed: int = 0  # initialisation, shuffling and document order
    out: str = "runs/saes/default"  # run directory (rerunning with it resumes)
    log_every: int = 20  # steps per metrics.jsonl line
    eval_every: int = 250  # CE loss recovered / KL every this many steps (0: at the end only)
    eval_rows: int = 8  # held-out rows for the CE / KL evaluation
    checkpoint_every: int = 250  # steps between orbax checkpoints
    keep_checkpoints: int = 2  # checkpoints kept on disk
    resume: bool = True  # resume from the latest checkpoint in out
    data_parallel: int = 0  # 0: every device not used for feature parallelism
    feature_parallel: int = 1  # devices the dictionary is split over ("model" mesh axis)
    dtype: str | None = None  # model dtype (default: models.default_dtype())
    progress: bool = True  # tqdm progress bar

    def __post_init__(self):
        """Check every field before anything is loaded: an InputError names the flag, its value and the rule."""
        _check_types(self)
        if self.arch not in sae_lib.ARCHS:
            raise InputError(f"unknown --arch {self.arch!r}; known: {', '.join(sae_lib.ARCHS)}")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise InputError(f"--b-dec-init must be geometric_median, mean or zeros, got {self.b_dec_init!r}")
        if self.cache is None:  # (a cache fixes its own hooks)
            _check_hooks(self.site, self.layers)
        for name, ok, rule in _RULES:
            if not ok(getattr(self, name)):
                raise InputError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(self, name)!r}")
        if self.arch in ("topk", "batchtopk") and self.k > self.width:
            raise InputError(f"--k ({self.k}) must be at most --width ({self.width})")
        if self.aux_k > self.width:
            raise InputError(f"--aux-k ({self.aux_k}) must be at most --width ({self.width})")
        if self.batch_size > self.chunk_tokens:
            raise InputError(f"--batch-size ({self.batch_size}) must be at most --chunk-tokens ({self.chunk_tokens})")
        if self.tokens < self.batch_size:
            raise InputError(f"--tokens ({self.tokens}) must be at least one batch (--batch-size {self.batch_size})")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_size

    @property
    def coeff(self) -> float:
        return DEFAULT_SPARSITY[self.arch] if self.sparsity_coeff is None else float(self.sparsity_coeff)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**d)


def _finite(lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False):
    def ok(x):
        return x is None or (math.isfinite(x) and (lo < x if lo_open else lo <= x) and (x < hi if hi_open else x <= hi))
    return ok


_positive = _finite(0, lo_open=True)
_unit = _finite(0, 1)
# (field, check, rule): the range each numeric field must lie in (None passes where the field is optional)
_RULES = (
    ("width", _finite(1), ">= 1"), ("k", _finite(1), ">= 1"), ("sparsity_coeff", _finite(0), "finite and >= 0"),
    ("context", _finite(2), ">= 2 (BOS + one token)"), ("model_batch", _finite(1), ">= 1"),
    ("chunk_tokens", _finite(1), ">= 1"), ("tokens", _finite(1), ">= 1"), ("batch_size", _finite(1), ">= 1"),
    ("lr", _positive, "finite and > 0"), ("lr_warmup_steps", _finite(0), ">= 0"), ("lr_decay_frac", _unit, "in [0, 1]"),
    ("sparsity_warmup_frac", _unit, "in [0, 1]"), ("beta1", _finite(0, 1, hi_open=True), "in [0, 1)"),
    ("beta2", _finite(0, 1, hi_open=True), "in [0, 1)"), ("grad_clip", _positive, "finite and > 0"),
    ("aux_coeff", _finite(0), "finite and >= 0"), ("aux_k", _finite(0), ">= 0"), ("aux_batch", _finite(0), ">= 0"),
    ("dead_tokens", _finite(1), ">= 1"), ("dense_freq", _finite(0, 1, lo_open=True), "in (0, 1]"),
    ("freq_window_steps", _finite(1), ">= 1"), ("bandwidth", _positive, "finite and > 0"),
    ("threshold_init", _finite(), "finite"), ("threshold_lr", _finite(0, 1, lo_open=True), "in (0, 1]"),
    ("decoder_init_norm", _positive, "finite and > 0"), ("log_every", _finite(1), ">= 1"),
    ("eval_rows", _finite(1), ">= 1"), ("checkpoint_every", _finite(1), ">= 1"), ("keep_checkpoints", _finite(1), ">= 1"),
    ("data_parallel", _finite(0), ">= 0"), ("feature_parallel", _finite(1), ">= 1"),
)


def _check_types(cfg: TrainConfig):
    """Each field holds its annotated type (int fields no floats or bools; tuples of the element type)."""
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), _hints()[f.name]
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            continue
        base = next((a for a in args if a is not type(None)), hint) if type(None) in args else hint
        if typing.get_origin(base) is tuple:
            inner = typing.get_args(base)[0]
            if isinstance(value, list):  # a list from Python or JSON is taken as the tuple
                value = tuple(value)
                object.__setattr__(cfg, f.name, value)
            ok = isinstance(value, tuple) and all(_is(v, inner) for v in value)
            what = f"a tuple of {inner.__name__}s"
        else:
            if base is str and isinstance(value, os.PathLike):  # out / corpus / cache given as a Path
                value = os.fspath(value)
                object.__setattr__(cfg, f.name, value)
            ok, what = _is(value, base), base.__name__
        if not ok:
            raise InputError(f"--{f.name.replace('_', '-')} must be {what}, got {value!r}")


def _check_hooks(sites, layers):
    from models.sites import SITES
    from saes.data import parse_hooks

    try:
        parse_hooks(sites, layers)
    except KeyError as e:
        raise InputError(f"--site: {e.args[0]}") from None
    unfit = [s for s in sites if "S" in SITES[s].axes]
    if unfit:
        raise InputError(f"--site {unfit}: attention scores/patterns have no fixed width for an SAE")
    if any(layer < 0 for layer in layers):
        raise InputError(f"--layers must be >= 0, got {layers}")


def _is(value, t) -> bool:
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


@functools.cache
def _hints() -> dict:
    return typing.get_type_hints(TrainConfig)


def validate(cfg: TrainConfig, model_cfg) -> None:
    """Checks that need the model's config (`models.Config`): layers inside the model, context within its
    context. Called as soon as the model's config is known, before any data is read."""
    if cfg.context > model_cfg.n_ctx:
        raise InputError(f"--context ({cfg.context}) is longer than the model's context of {model_cfg.n_ctx}")
    bad = [layer for layer in cfg.layers if not 0 <= layer < model_cfg.n_layers]
    if bad and not cfg.cache:
        raise InputError(f"--layers {bad} out of range for a {model_cfg.n_layers}-layer model (valid: 0 to "
                         f"{model_cfg.n_layers - 1})")


class TrainState(eqx.Module):
    """Everything a step changes: the SAEs, the optimizer state, per-feature statistics, the step, and
    the first step at which anything became non-finite (-1: none)."""

    saes: dict[str, SAE]
    opt_state: Any
    since_fired: dict[str, jax.Array]  # tokens since each latent last fired
    freq: dict[str, jax.Array]  # moving average of each latent's firing frequency
    step: jax.Array
    bad_step: jax.Array


@dataclass
class TrainResult:
    saes: dict[str, SAE]
    metrics: dict[str, Any]
    out: Path
    state: TrainState | None = None
    history: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- optimisation


def lr_schedule(cfg: TrainConfig):
    steps = max(cfg.steps, 1)
    warm = min(cfg.lr_warmup_steps, steps)
    decay = int(cfg.lr_decay_frac * steps)
    flat = max(steps - warm - decay, 0)
    # warm-up: lr/warm at step 0 rising linearly to lr at step warm - 1; decay: linear to 0 at the last step
    parts = [optax.linear_schedule(cfg.lr / max(warm, 1), cfg.lr, max(warm - 1, 1)),
             optax.constant_schedule(cfg.lr),
             optax.linear_schedule(cfg.lr, 0.0, max(decay, 1))]
    return optax.join_schedules(parts, [max(warm, 1), max(warm, 1) + flat])


def make_optimizer(cfg: TrainConfig):
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                       optax.adam(lr_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2))


def sparsity_schedule(cfg: TrainConfig, step):
    warm = cfg.sparsity_warmup_frac * cfg.steps
    if warm <= 0:
        return jnp.asarray(cfg.coeff, jnp.float32)
    return cfg.coeff * jnp.minimum(1.0, (step + 1) / warm)


def _trainable(saes):
    return {h: s.trainable() for h, s in saes.items()}


# ----------------------------------------------------------------------------- state


def fresh_state(cfg: TrainConfig, hooks: dict[str, tuple[str, int | None, int]], key) -> TrainState:
    """A state with freshly initialised SAEs (act_scale 1, b_dec 0) for `{hook: (site, layer, d_in)}`."""
    saes = {}
    for i, (hook, (site, layer, d_in)) in enumerate(sorted(hooks.items())):
        saes[hook] = sae_lib.init(cfg.arch, d_in, cfg.width, jax.random.fold_in(key, i), site=site,
                                  layer=-1 if layer is None else layer, k=cfg.k, bandwidth=cfg.bandwidth,
                                  threshold=cfg.threshold_init, decoder_norm=cfg.decoder_init_norm)
    opt = make_optimizer(cfg)
    params = eqx.filter(saes, _trainable(saes))
    return TrainState(
        saes=saes, opt_state=opt.init(params),
        since_fired={h: jnp.zeros((cfg.width,), jnp.int32) for h in saes},
        freq={h: jnp.zeros((cfg.width,), jnp.float32) for h in saes},
        step=jnp.zeros((), jnp.int32), bad_step=jnp.full((), -1, jnp.int32),
    )


def geometric_median(x, iters: int = 30, eps: float = 1e-6):
    """Weiszfeld's algorithm for the geometric median of rows of `x` (starting from the mean)."""

    def body(_, m):
        w = 1.0 / jnp.maximum(jnp.linalg.norm(x - m, axis=-1), eps)
        return (w[:, None] * x).sum(0) / w.sum()

    return jax.lax.fori_loop(0, iters, body, x.mean(0))


def calibrate(state: TrainState, chunk: dict, cfg: TrainConfig) -> TrainState:
    """Set each SAE's `act_scale` (mean norm -> sqrt(d_in)) and `b_dec` (geometric median / mean of the
    normalised data) from the first chunk."""
    saes = dict(state.saes)
    for hook, sae in saes.items():
        x = jnp.asarray(chunk[hook][: min(chunk[hook].shape[0], 16384)], jnp.float32)
        scale = jnp.sqrt(sae.d_in) / jnp.mean(jnp.linalg.norm(x, axis=-1)) if cfg.normalize else jnp.ones(())
        xn = x * scale
        if cfg.b_dec_init == "geometric_median":
            b = geometric_median(xn)
        elif cfg.b_dec_init == "mean":
            b = xn.mean(0)
        else:
            b = jnp.zeros((sae.d_in,))
        saes[hook] = eqx.tree_at(lambda m: (m.act_scale, m.b_dec), sae,
                                 (scale.astype(jnp.float32).reshape(()), b.astype(sae.b_dec.dtype)))
    return eqx.tree_at(lambda s: s.saes, state, saes)


# ----------------------------------------------------------------------------- sharding


def make_mesh(cfg: TrainConfig):
    """The ("data", "model") mesh of the config, or None on a single device."""
    from jax.sharding import Mesh

    n = len(jax.devices())
    fp = max(cfg.feature_parallel, 1)
    dp = cfg.data_parallel or n // fp
    if dp * fp == 1:
        return None
    if dp * fp > n:
        raise InputError(f"data_parallel {dp} x feature_parallel {fp} needs {dp * fp} devices, have {n}")
    return Mesh(np.asarray(jax.devices()[: dp * fp]).reshape(dp, fp), ("data", "model"))


def state_specs(state: TrainState, mesh, widths: set[int]):
    """PartitionSpecs: the first axis of each array whose size is a dictionary width goes to the mesh axis of
    the logical axis "features" (`models.sharding.RULES`), everything else is replicated."""
    from jax.sharding import PartitionSpec as P

    from models.sharding import RULES

    axis = dict(RULES).get("features")

    def spec(x):
        if not eqx.is_array(x) or mesh is None or axis not in mesh.shape:
            return P()
        for i, n in enumerate(x.shape):
            if n in widths and n % mesh.shape[axis] == 0:
                return P(*([None] * i + [axis]))
        return P()

    return jax.tree.map(spec, state)


def place_state(state: TrainState, mesh, widths):
    from jax.sharding import NamedSharding

    if mesh is None:
        return state
    specs = state_specs(state, mesh, widths)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)) if eqx.is_array(x) else x, state, specs)


def batch_spec(mesh):
    from jax.sharding import PartitionSpec as P

    from models.sharding import RULES

    axis = dict(RULES).get("batch")
    return P(axis if mesh is not None and axis in mesh.shape else None, None)


# ----------------------------------------------------------------------------- the step


def make_step(cfg: TrainConfig, mesh=None, widths=frozenset()):
    """The jitted train step `(state, batch {hook: [B, d_in]}) -> (state, metrics)`."""
    opt = make_optimizer(cfg)
    schedule = lr_schedule(cfg)
    alpha = 1.0 / max(cfg.freq_window_steps, 1)

    def step_fn(state: TrainState, batch: dict):
        saes = state.saes
        mask = _trainable(saes)
        params, rest = eqx.partition(saes, mask)
        coeff = sparsity_schedule(cfg, state.step)
        dead = {h: state.since_fired[h] >= cfg.dead_tokens for h in saes}

        def loss_fn(params):
            models = eqx.combine(params, rest)
            total, aux = 0.0, {}
            for h, sae in models.items():
                xn = batch[h].astype(jnp.float32) * sae.act_scale
                loss, a = sae.loss(xn, coeff, dead[h], cfg.aux_coeff, cfg.aux_k, cfg.aux_batch)
                a["xn"] = xn
                aux[h] = (loss, a)
                total = total + loss
            return total, aux

        (total, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grads = {h: eqx.tree_at(lambda m: m.W_dec, g, saes[h].project_decoder_grad(g.W_dec)) for h, g in grads.items()}
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = opt.update(grads, state.opt_state, params)
        params = eqx.apply_updates(params, updates)
        new_saes = {h: s.constrain().update_buffers(aux[h][1], cfg.threshold_lr)
                    for h, s in eqx.combine(params, rest).items()}

        metrics = {"loss": total, "lr": schedule(state.step), "sparsity_coeff": coeff, "grad_norm": grad_norm}
        since, freq = {}, {}
        for h, sae in new_saes.items():
            loss, a = aux[h]
            B = a["xn"].shape[0]
            fires = a["fires"]
            since[h] = jnp.where(fires > 0, 0, jnp.minimum(state.since_fired[h] + B, 2**30))
            freq[h] = (1 - alpha) * state.freq[h] + alpha * fires.astype(jnp.float32) / B
            xn = a["xn"]
            err = jnp.sum(jnp.square(xn - a["x_hat"]))
            var = jnp.sum(jnp.square(xn - xn.mean(0)))
            fvu = err / var
            metrics[h] = {
                "loss": loss, "mse": err / xn.size, "fvu": fvu, "explained_variance": 1 - fvu, "l0": a["l0"],
                "sparsity": a["sparsity"], "auxk": a["auxk"],
                "dead_frac": jnp.mean(since[h] >= cfg.dead_tokens), "dense_frac": jnp.mean(freq[h] > cfg.dense_freq),
                **sae.train_metrics(),
            }

        finite = jnp.isfinite(total) & jnp.all(jnp.asarray(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(eqx.filter(new_saes, eqx.is_inexact_array))]))
        bad = jnp.where((state.bad_step < 0) & ~finite, state.step, state.bad_step)
        new_state = TrainState(saes=new_saes, opt_state=opt_state, since_fired=since, freq=freq,
                               step=state.step + 1, bad_step=bad)
        if mesh is not None:
            from jax.sharding import NamedSharding

            specs = state_specs(new_state, mesh, widths)
            new_state = jax.tree.map(
                lambda x, s: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, s)) if eqx.is_array(x) else x,
                new_state, specs)
        return new_state, metrics

    return jax.jit(step_fn, donate_argnums=(0,))


def _permute_fn(mesh):
    @jax.jit
    def permute(chunk, key):
        n = next(iter(chunk.values())).shape[0]
        perm = jax.random.permutation(key, n)
        return {h: jnp.take(a, perm, axis=0) for h, a in chunk.items()}

    return permute


def _slice_fn(batch_size: int, mesh):
    from jax.sharding import NamedSharding

    def slice_(chunk, j):
        return {h: jax.lax.dynamic_slice_in_dim(a, j * batch_size, batch_size, 0) for h, a in chunk.items()}

    if mesh is None:
        return jax.jit(slice_)
    return jax.jit(slice_, out_shardings=NamedSharding(mesh, batch_spec(mesh)))


# ----------------------------------------------------------------------------- checkpoints


class CheckpointCorrupt(RuntimeError):
    """A checkpoint that does not restore, or whose contents do not match the checksum stored with it."""


def state_digest(leaves, meta: dict) -> str:
    """SHA-256 over every leaf's dtype, shape and bytes (in order) and the JSON metadata."""
    h = hashlib.sha256()
    for x in leaves:
        a = np.asarray(jax.device_get(x))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


class Checkpointer:
    """Orbax checkpoints of the state's leaves plus a JSON record of the data-stream position and seed.

    Each checkpoint carries the `state_digest` of what was saved in orbax's step metadata (written with the
    checkpoint, atomically); `restore` recomputes it and raises `CheckpointCorrupt` on any difference, and
    `restore_valid` falls back to the newest checkpoint that restores and verifies."""

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.dir = Path(directory).absolute()
        self.mgr = ocp.CheckpointManager(self.dir, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, create=True))

    def latest(self) -> int | None:
        return self.mgr.latest_step()

    def save(self, step: int, state: TrainState, meta: dict):
        ocp = self.ocp
        leaves = jax.tree.leaves(state)
        self.mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(leaves), meta=ocp.args.JsonSave(meta)),
                      force=True, custom_metadata={"sha256": state_digest(leaves, meta)})
        self.mgr.wait_until_finished()

    def restore(self, abstract: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """The state and metadata of checkpoint `step` (default: the latest), verified against its checksum."""
        ocp = self.ocp
        step = self.latest() if step is None else step
        leaves, treedef = jax.tree.flatten(abstract)
        where = self.dir / str(step)
        try:
            want = (self.mgr.metadata(step).custom_metadata or {}).get("sha256")
            got = self.mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(leaves),
                                                                 meta=ocp.args.JsonRestore()))
            restored, meta = list(got["state"]), dict(got["meta"])
        except Exception as e:  # orbax/tensorstore raise many types for damaged files; all mean "unusable"
            raise CheckpointCorrupt(f"checkpoint {where} does not restore: {type(e).__name__}: {e}") from e
        if want is None:
            raise CheckpointCorrupt(f"checkpoint {where} has no checksum (sha256 in its step metadata)")
        if state_digest(restored, meta) != want:
            raise CheckpointCorrupt(f"checkpoint {where} restores different bytes than were saved (checksum mismatch)")
        return jax.tree.unflatten(treedef, restored), meta

    def restore_valid(self, abstract: TrainState) -> tuple[TrainState, dict, int] | None:
        """(state, meta, step) of the newest checkpoint that restores and verifies, or None if there is none.
        Damaged newer ones are reported on stderr and moved to `<dir>.damaged/` (kept for inspection)."""
        for step in sorted(self.mgr.all_steps(), reverse=True):
            try:
                return (*self.restore(abstract, step), step)
            except CheckpointCorrupt as e:
                aside = self.dir.with_name(self.dir.name + ".damaged") / str(step)
                print(f"{e}; moved to {aside}, falling back to the previous checkpoint", file=sys.stderr)
                aside.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(aside, ignore_errors=True)
                shutil.move(str(self.dir / str(step)), str(aside))
                self.mgr.reload()
        return None

    def close(self):
        self.mgr.close()


def _abstract(state, mesh, widths):
    from jax.sharding import NamedSharding, SingleDeviceSharding

    specs = state_specs(state, mesh, widths)

    def to_abstract(x, s):
        if not eqx.is_array(x):
            return x
        sharding = NamedSharding(mesh, s) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(to_abstract, state, specs)


# ----------------------------------------------------------------------------- sources from a config


def build_source(cfg: TrainConfig, model=None, docs: Callable[..., Iterable[str]] | None = None):
    """(model or None, source, eval tokens or None) for a config: an activation cache if `cfg.cache`, else
    the model on the corpus (`docs`, a document function as `TokenRows` takes, replaces `cfg.corpus`)."""
    from saes import data

    if docs is not None and cfg.corpus:
        raise InputError(f"give either docs (a document function) or corpus={cfg.corpus!r}, not both")
    if cfg.cache:
        source = data.CachedSource(cfg.cache)
        if model is None and cfg.eval_every >= 0 and source.meta.get("model"):
            model = _load_model(source.meta["model"], cfg.dtype)
        if model is not None:
            validate(cfg, model.cfg)
        eval_tokens = _eval_rows(cfg, model, docs) if model is not None else None
        return model, source, eval_tokens
    model = model if model is not None else _load_model(cfg.model, cfg.dtype)
    validate(cfg, model.cfg)
    hooks = data.parse_hooks(cfg.site, cfg.layers)
    rows = _token_rows(cfg, model, "train", docs)
    source = data.ModelSource(model, hooks, rows, chunk_tokens=cfg.chunk_tokens, model_batch=cfg.model_batch)
    source.meta.update(corpus=cfg.corpus or ("the caller's docs" if docs is not None else
                                             "default (Python + package docstrings)"))
    return model, source, _eval_rows(cfg, model, docs)


def _eval_rows(cfg, model, docs=None):
    """Held-out rows for CE evaluation (every 50th document); a corpus too small for that uses its first rows."""
    try:
        return _token_rows(cfg, model, "eval", docs).take(cfg.eval_rows)
    except InputError:
        print("corpus too small for a held-out split: evaluating on its first rows", file=sys.stderr)
        return _token_rows(cfg, model, "all", docs).take(cfg.eval_rows)


def _load_model(name, dtype):
    import models

    return models.load(name, dtype=dtype)


def _token_rows(cfg, model, split, docs=None):
    from saes import data

    if docs is None and cfg.corpus:
        docs = lambda: data.iter_documents(cfg.corpus, cfg.text_field)  # noqa: E731
    elif docs is None:
        docs = data.default_corpus
    return data.TokenRows(docs, model.tokenizer, cfg.context, split=split, seed=cfg.seed)


def _hook_info(source) -> dict[str, tuple[str, int | None, int]]:
    """{hook: (site, layer, d_in)} from a source's hook names (`saes.data.parse_hook`: validated identities)."""
    from saes.data import parse_hook

    return {h: (*parse_hook(h), int(source.d_in[h])) for h in source.hooks}


# ----------------------------------------------------------------------------- the loop


def _to_host(tree):
    return jax.tree.map(lambda x: float(np.asarray(x)), jax.device_get(tree))


def train(cfg: TrainConfig, *, source=None, model=None, eval_tokens=None, stop_after: int | None = None,
          docs: Callable[..., Iterable[str]] | None = None) -> TrainResult:
    """Train (or resume) the run `cfg` describes; see the module docstring. `source`/`model`/`eval_tokens`
    override what the config would build (tests, notebooks). `docs` is the document function for the token
    rows instead of `cfg.corpus` (called with a seed per epoch if it takes one, as `TokenRows` does; e.g.
    `lambda seed=0: saes.data.mix_corpora(corpora, weights, seed)`); it is not part of the saved config, so
    resume a run with the same `docs`. `stop_after` ends the loop early after that many steps in this call
    (the run can be resumed)."""
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    finished = _finished(cfg, out)
    if finished is not None:
        from saes import formats

        print(f"{out} is already finished ({cfg.steps} steps, report.json written): nothing to do (another --out or "
              "--resume false trains again)", file=sys.stderr)
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return TrainResult(formats.load_run(out), finished, out, None, history)
    if source is None:
        model, source, built_eval = build_source(cfg, model, docs)
        eval_tokens = built_eval if eval_tokens is None else eval_tokens
    (out / "config.json").write_text(json.dumps(cfg.to_json(), indent=1))

    mesh = make_mesh(cfg)
    widths = {cfg.width}
    hooks = _hook_info(source)
    key = jax.random.key(cfg.seed)
    step_fn = make_step(cfg, mesh, widths)
    permute, slice_ = _permute_fn(mesh), _slice_fn(cfg.batch_size, mesh)
    if not cfg.resume:  # a fresh run in this directory: earlier checkpoints would collide with this run's
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    ckpt = Checkpointer(out / "checkpoints", cfg.keep_checkpoints)
    metrics_path = out / "metrics.jsonl"

    template = jax.eval_shape(lambda: fresh_state(cfg, hooks, key))
    had_checkpoints = bool(ckpt.mgr.all_steps())
    restored = ckpt.restore_valid(_abstract(template, mesh, widths)) if cfg.resume else None
    latest = None if restored is None else restored[2]
    if restored is None and had_checkpoints and cfg.resume:
        print(f"no checkpoint in {ckpt.dir} is usable: training {out} from the start", file=sys.stderr)
    if restored is not None:
        state, meta, _ = restored
        _check_same_run(cfg, meta.get("config"), out)
        position, chunk_index, batch_in_chunk = meta["position"], meta["chunk_index"], meta["batch_in_chunk"]
        history = _read_history(metrics_path, latest)
        it = source.chunks(position)
        chunk, next_position = next(it)
        print(f"resuming {out} from step {latest}", file=sys.stderr)
    else:
        position, chunk_index, batch_in_chunk, history = 0, 0, 0, []
        metrics_path.write_text("")
        it = source.chunks(position)
        chunk, next_position = next(it)
        state = calibrate(fresh_state(cfg, hooks, key), chunk, cfg)
        state = place_state(state, mesh, widths)

    total = cfg.steps
    step = int(state.step)
    n_batches = next(iter(chunk.values())).shape[0] // cfg.batch_size
    if n_batches == 0:
        raise InputError(f"chunks of {next(iter(chunk.values())).shape[0]} activations hold no batch of {cfg.batch_size}")
    bar = tqdm(total=total, initial=step, unit="step", disable=not cfg.progress, dynamic_ncols=True)
    acc, acc_n, t_last, tok_last = None, 0, time.perf_counter(), step * cfg.batch_size
    last_good = latest
    this_call = 0
    try:
        while step < total and (stop_after is None or this_call < stop_after):
            shuffled = permute(chunk, jax.random.fold_in(key, chunk_index))
            for j in range(batch_in_chunk, n_batches):
                if step >= total or (stop_after is not None and this_call >= stop_after):
                    break
                state, m = step_fn(state, slice_(shuffled, j))
                step += 1
                this_call += 1
                acc = m if acc is None else jax.tree.map(jnp.add, acc, m)
                acc_n += 1
                batch_in_chunk = j + 1
                if step % cfg.log_every == 0 or step == total:
                    _check_finite(state, last_good, ckpt.dir)
                    now = time.perf_counter()
                    rec = {"step": step, "tokens": step * cfg.batch_size,
                           "tokens_per_s": (step * cfg.batch_size - tok_last) / max(now - t_last, 1e-9),
                           **_to_host(jax.tree.map(lambda a: a / acc_n, acc))}
                    t_last, tok_last, acc, acc_n = now, step * cfg.batch_size, None, 0
                    _log(metrics_path, rec, history)
                    bar.set_postfix(_postfix(rec), refresh=False)
                if (cfg.eval_every and step % cfg.eval_every == 0 and step < total and model is not None
                        and eval_tokens is not None):  # (the last step is evaluated after the loop)
                    _log(metrics_path, {"step": step, "eval": _evaluate(model, state.saes, eval_tokens)}, history)
                if step % cfg.checkpoint_every == 0 or step == total:
                    _check_finite(state, last_good, ckpt.dir)
                    ckpt.save(step, state, dict(position=position, chunk_index=chunk_index,
                                                batch_in_chunk=batch_in_chunk, seed=cfg.seed, step=step,
                                                config=cfg.to_json()))
                    last_good = step
                bar.update(1)
            else:
                chunk_index += 1
                batch_in_chunk = 0
                position = next_position
                if step < total:
                    chunk, next_position = next(it)
    finally:
        bar.close()
    _check_finite(state, last_good, ckpt.dir)
    ckpt.close()
    saes = state.saes
    if step < total:
        return TrainResult(saes, {}, out, state, history)

    final = {}
    if model is not None and eval_tokens is not None:
        final = _evaluate(model, saes, eval_tokens)
        _log(metrics_path, {"step": step, "eval": final}, history)
    from saes import formats, report

    model_name = getattr(model, "name", None) or (getattr(source, "meta", None) or {}).get("model")
    from saes.data import hook_dir

    for h, sae in saes.items():
        formats.save(sae, hook_dir(out / "saes", h), meta=dict(model=model_name, training=cfg.to_json(), step=step))
    summary = report.write(out, cfg, history, final)
    return TrainResult(saes, summary, out, state, history)


# fields that may change when a run is resumed (how it is run, not what it computes)
RESUMABLE_CHANGES = frozenset({"out", "progress", "log_every", "eval_every", "eval_rows", "checkpoint_every",
                               "keep_checkpoints", "resume", "cache", "data_parallel", "feature_parallel", "dtype"})


def _check_same_run(cfg: TrainConfig, saved: dict | None, out: Path):
    if not saved:
        return
    now = cfg.to_json()
    diff = sorted(k for k in now if k not in RESUMABLE_CHANGES and k in saved
                  and json.dumps(now[k]) != json.dumps(saved[k]))
    if diff:
        changes = ", ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in diff)
        raise InputError(f"{out} holds checkpoints of a different run ({changes}); use another --out or --resume false")


def _finished(cfg: TrainConfig, out: Path) -> dict | None:
    """The report of a finished run of `cfg` in `out` (None if it has not finished, or `cfg.resume` is off)."""
    path = out / "report.json"
    if not cfg.resume or not path.exists():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # a damaged report: the run is resumed from its checkpoints and writes it again
    _check_same_run(cfg, summary.get("config"), out)
    return summary if summary.get("steps") == cfg.steps and (out / "saes").is_dir() else None


def _check_finite(state: TrainState, last_good, directory):
    bad = int(state.bad_step)
    if bad >= 0:
        where = f"step {last_good} in {directory}" if last_good is not None else "none was written"
        raise TrainingDiverged(f"non-finite loss or parameters at step {bad + 1}; training stopped. "
                               f"Last good checkpoint: {where}. Lower --lr, raise --grad-clip or check the data.")


def _evaluate(model, saes, tokens):
    from saes.evaluate import ce_metrics

    return ce_metrics(model, saes, tokens)


def _log(path: Path, rec: dict, history: list):
    history.append(rec)
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def _read_history(path: Path, upto: int) -> list[dict]:
    """Metrics lines up to step `upto` (later ones, from after the checkpoint, are dropped and rewritten)."""
    if not path.exists():
        return []
    keep = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in keep if r["step"] <= upto]
    path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return keep


def _postfix(rec: dict) -> dict:
    hooks = [k for k, v in rec.items() if isinstance(v, dict)]
    if not hooks:
        return {}
    h = rec[hooks[0]]
    return {"EV": f"{h['explained_variance']:.3f}", "L0": f"{h['l0']:.1f}", "dead": f"{h['dead_frac']:.2f}",
            "tok/s": f"{rec['tokens_per_s']:.0f}"}


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    """The CLI of `TrainConfig` (`models.cli`): each flag with its description and default."""
    return cli.parser(TrainConfig, prog="python -m saes.train", description=__doc__.split("\n\n")[0])


def main(argv=None) -> TrainResult:
    cfg = cli.parse(TrainConfig, argv, prog="python -m saes.train", description=__doc__.split("\n\n")[0])
    result = train(cfg)
    print(json.dumps(result.metrics, indent=1))
    return result


if __name__ == "__main__":
    main()
