"""SAE architectures as equinox modules sharing one encode/decode plumbing.

    sae = saes.init("topk", d_in=576, width=8192, key=jax.random.key(0), k=32, site="resid_post", layer=10)
    f = sae.encode(x)            # [..., width] feature activations of raw activations x [..., d_in]
    x_hat = sae.decode(f)        # [..., d_in]
    x_hat = sae(x)               # both

Every architecture has the same parameters `W_enc [d_in, width]`, `b_enc [width]`, `W_dec [width, d_in]`,
`b_dec [d_in]` (SAELens/Gemma Scope layout and names), plus its own (`threshold`,
`r_mag`/`b_mag`/`b_gate`), and a scalar `act_scale`: inputs are multiplied by it before encoding and
reconstructions divided by it after decoding, so an SAE trained on activations normalised to a fixed mean
norm is used on raw activations unchanged (`fold_scale()` bakes it into the weights for export). A skip
transcoder (Paulo et al. 2025, arXiv 2501.18823; `init(..., skip=True)`) adds a linear path `x @ W_skip` to
its prediction (`sae(x)`; `decode` is the features' part alone).

Training goes through `sae.loss(xn, coeff, dead)` on *normalised* inputs `xn = x * act_scale`:
reconstruction `mean_batch(sum_d (xn - xn_hat)^2)` plus the architecture's sparsity term:

| arch        | features                                        | sparsity term (coefficient `coeff`)              | decoder rows |
|-------------|-------------------------------------------------|--------------------------------------------------|--------------|
| `relu`      | relu(pre)                                       | L1 weighted by decoder norms: sum_i f_i ||d_i||   | free         |
| `topk`      | k largest of relu(pre) per token                | none (AuxK on dead latents, `aux_coeff`)         | unit norm    |
| `batchtopk` | k*batch largest over the batch; inference: pre > threshold (EMA of the smallest kept value) | AuxK | unit norm |
| `jumprelu`  | pre * H(pre - theta), learned theta [width]      | L0 = sum_i H(pre_i - theta_i), rectangle-kernel STE | unit norm |
| `gated`     | H(pi_gate) * relu(pi_mag), W_mag = W_enc*exp(r_mag) | L1 of relu(pi_gate) (times decoder norms) + aux reconstruction through the frozen decoder | unit norm |

Each architecture is a final subclass of the abstract `SAE` (a `saes.core.dictionary.Dictionary`) that joins
`ARCHS` with `@register_arch`; `init` and `from_arrays` build any registered one through its `fresh_fields` /
`fields_from`, so a new architecture is one class in one place.

`pre = (x - b_dec) @ W_enc + b_enc`. "Unit norm" decoders are renormalised after every optimizer step and
their gradient's component along each row is projected out first (`saes.train.step`). Each class declares
the logical axes of its arrays (`axes`), by which `saes.train.state` shards them.
"""

from __future__ import annotations

import abc
from functools import partial
from typing import ClassVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from models.errors import InputError
from models.sites import SITES, Hook
from saes.core.dictionary import Dictionary, site_width, trainable_arrays

__all__ = [
    "ARCHS", "ARRAY_SHAPES", "SAE", "BatchTopKSAE", "check_arrays", "GatedSAE", "JumpReLUSAE", "ReLUSAE", "TopKSAE", "init", "jumprelu", "step",
    "rectangle", "hook_name", "register_arch", "sparse_decode", "sparse_encode", "trainable_arrays",
]


def hook_name(site: str, layer: int | None) -> str:
    """The key of one SAE in a run: `models.Hook(site, layer).key` (`"L10.resid_post"`; a model site: its name);
    a stream not read from a model (synthetic data) keeps its plain name."""
    return Hook(site, layer).key if site in SITES else site


# ----------------------------------------------------------------------------- JumpReLU straight-through estimator


def rectangle(u):
    """The rectangle kernel K(u) = 1 on (-1/2, 1/2), else 0."""
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(x, threshold, bandwidth: float):
    """JumpReLU_theta(x) = x * H(x - theta). Pseudo-derivatives (Rajamanoharan et al. 2024, eq. 11):
    d/dx = H(x - theta); d/dtheta = -(theta / eps) K((x - theta) / eps) with the rectangle kernel K."""
    return x * (x > threshold).astype(x.dtype)


def _jumprelu_fwd(x, threshold, bandwidth):
    return jumprelu(x, threshold, bandwidth), (x, threshold)


def _jumprelu_bwd(bandwidth, res, g):
    x, threshold = res
    dx = (x > threshold).astype(x.dtype) * g
    dtheta = -(threshold / bandwidth) * rectangle((x - threshold) / bandwidth) * g
    return dx, _sum_to(dtheta, threshold.shape)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(x, threshold, bandwidth: float):
    """Heaviside H(x - theta). Pseudo-derivatives: d/dx = 0; d/dtheta = -(1 / eps) K((x - theta) / eps)."""
    return (x > threshold).astype(x.dtype)


def _step_fwd(x, threshold, bandwidth):
    return step(x, threshold, bandwidth), (x, threshold)


def _step_bwd(bandwidth, res, g):
    x, threshold = res
    dtheta = -(1.0 / bandwidth) * rectangle((x - threshold) / bandwidth) * g
    return jnp.zeros_like(x), _sum_to(dtheta, threshold.shape)


step.defvjp(_step_fwd, _step_bwd)


def _sum_to(x, shape):
    """Sum the leading broadcast axes of `x` away so it has `shape` (the threshold's)."""
    lead = x.ndim - len(shape)
    return x.sum(tuple(range(lead))) if lead else x


# ----------------------------------------------------------------------------- the shared plumbing


class SAE(Dictionary):
    """The abstract SAE: shared fields and plumbing; see the module docstring. Each architecture is a final
    subclass that sets `arch` and `activate`, and joins `ARCHS` with `@register_arch` (its own arrays and
    static fields come from `fresh_fields` and `fields_from`)."""

    W_enc: Float[Array, "d_in width"]
    b_enc: Float[Array, " width"]
    W_dec: Float[Array, "width d_in"]
    b_dec: Float[Array, " d_in"]
    act_scale: Float[Array, ""]
    W_skip: Float[Array, "d_in d_in"] | None  # a skip transcoder's linear path (input -> target); None: none
    site: str = eqx.field(static=True)  # a `models.sites` name ("" or a plain name: not read from a model)
    layer: int | None = eqx.field(static=True)  # None: a model site, or not tied to one layer
    target: str | None = eqx.field(static=True)  # a transcoder: the site (same layer) it predicts; None: an SAE

    arch: ClassVar[str] = ""
    unit_norm_decoder: ClassVar[bool] = False
    extra_arrays: ClassVar[tuple[str, ...]] = ()  # arrays beyond the shared ones a file of this arch must hold
    # logical axes of each array field (`models.sharding.RULES`: "features" is the dictionary, "embed" the input)
    axes: ClassVar[dict[str, tuple[str, ...]]] = {
        "W_enc": ("embed", "features"), "b_enc": ("features",), "W_dec": ("features", "embed"), "b_dec": ("embed",),
        "act_scale": (), "W_skip": ("embed", "embed"),
    }

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def width(self) -> int:
        return self.W_enc.shape[1]

    @property
    def latent_shape(self) -> tuple[int]:
        """The shape of per-latent statistics (`[width]`; a cross-layer transcoder's: `[L, width]`)."""
        return (self.width,)

    @property
    def hook(self) -> str:
        return hook_name(self.site, self.layer)

    # -- the public, raw-activation API
    def enc_bias(self) -> Float[Array, " width"]:
        """The encoder's total bias: `b_enc - b_dec @ W_enc` for an SAE (inputs are centred by `b_dec`);
        a transcoder's `b_dec` lives in its target's space, so its inputs are not centred: `b_enc`."""
        return self.b_enc if self.target else self.b_enc - self.b_dec @ self.W_enc

    def pre_acts(self, xn: Float[Array, "... d_in"]) -> Float[Array, "... width"]:
        """Encoder pre-activations of normalised inputs, `xn @ W_enc + enc_bias()` (so the gradient of `b_dec`
        is a vector-matrix product, not a third batch-sized matmul)."""
        return xn @ self.W_enc + self.enc_bias()

    @abc.abstractmethod
    def activate(self, pre: Float[Array, "... width"], xn=None) -> Float[Array, "... width"]:
        """Feature activations from pre-activations (Gated reads the normalised input `xn` instead)."""

    @classmethod
    def fresh_fields(cls, width: int, dtype, *, k: int, bandwidth: float, threshold: float) -> dict:
        """The fields of a fresh SAE of this architecture beyond the shared ones (`init`)."""
        return {}

    @classmethod
    def fields_from(cls, arrays: dict, *, k: int, bandwidth: float) -> dict:
        """The fields beyond the shared ones from named arrays (`from_arrays`)."""
        return {}

    def streams(self, batch: dict, hook: str):
        """Its input `batch[hook]` and a transcoder's target (at its layer; None for an SAE)."""
        return batch[hook], None if self.target is None else batch[self.target_hook.key]

    def pre_acts_at(self, xn: Float[Array, "B d_in"], cols, rows=None, known=None) -> Float[Array, "m c"]:
        """`pre_acts(xn)` at entries `(rows, cols)` ([m, c] each; see `sparse_encode`), with gradients only
        through them: the sparse architectures select on the dense pre-activations under stop_gradient, and
        pass those values as `known` ([m, c]) so only the gradient is computed here."""
        bias = _take(self.enc_bias(), cols)
        known = None if known is None else known - jax.lax.stop_gradient(bias)
        return sparse_encode(self.W_enc.T, xn, cols, rows, known) + bias

    @jax.named_scope("sae.encode")
    def encode(self, x: Float[ArrayLike, "... d_in"]) -> Float[Array, "... width"]:
        """Feature activations of raw activations `x` (inference rule: BatchTopK uses its threshold)."""
        xn = x * self.act_scale
        return self.activate(self.pre_acts(xn), xn)

    @jax.named_scope("sae.decode")
    def decode(self, f: Float[ArrayLike, "... width"]) -> Float[Array, "... d_in"]:
        """The features' part of the reconstruction (a transcoder: of the prediction of its target), raw scale."""
        return (f @ self.W_dec + self.b_dec) / self.act_scale

    def skip(self, x: Float[ArrayLike, "... d_in"]) -> Float[Array, "... d_in"] | float:
        """A skip transcoder's linear path `x @ W_skip` (the same on raw and normalised inputs: the scale
        cancels), 0 without one."""
        return 0.0 if self.W_skip is None else x @ self.W_skip

    def __call__(self, x: Float[ArrayLike, "... d_in"]) -> Float[Array, "... d_in"]:
        """The reconstruction (a transcoder: its prediction, skip path included) of raw activations."""
        return self.decode(self.encode(x)) + self.skip(x)

    @property
    def target_hook(self) -> Hook | None:
        """A transcoder's output stream `Hook(target, layer)`; None for an SAE."""
        return Hook(self.target, self.layer) if self.target else None

    # -- training
    def loss(self, xn, coeff, dead, aux_coeff: float = 1 / 32, aux_k: int = 0, aux_batch: int = 0, yn=None):
        """`(loss, aux)` on a normalised batch `xn [B, d_in]`; `dead [width]` marks latents for AuxK, which
        uses the first `aux_batch` tokens of the (shuffled) batch (0: all of them). A transcoder is trained to
        predict `yn [B, d_in]` (its target site, normalised by the same `act_scale`); an SAE reconstructs `xn`.

        `aux` holds `recon` (the reconstruction term), `sparsity`, `auxk`, `fires [width]` (tokens each
        latent fired on), `l0`, `x_hat` (normalised), and for BatchTopK `min_kept`."""
        f = self.activate(self.pre_acts(xn), xn)
        x_hat = f @ self.W_dec + self.b_dec + self.skip(xn)
        recon = _sq(_goal(xn, yn) - x_hat)
        return recon, self._aux(f, x_hat, recon, 0.0, 0.0)

    @staticmethod
    def _aux(f, x_hat, recon, sparsity, auxk, **extra):
        active = f > 0
        return dict(recon=recon, sparsity=sparsity, auxk=auxk, fires=active.sum(0, dtype=jnp.int32),
                    l0=active.sum(-1).mean(), x_hat=x_hat, **extra)

    def fold_scale(self) -> "SAE":
        """The same function of raw activations with `act_scale` baked into the weights (`act_scale = 1`)."""
        s = self.act_scale
        return eqx.tree_at(lambda m: (m.W_enc, m.W_dec, m.b_dec, m.act_scale), self,
                           (self.W_enc * s, self.W_dec / s, self.b_dec / s, jnp.ones_like(s)))

    def constrain(self) -> "SAE":
        """Re-impose the architecture's constraints after an optimizer step (unit-norm decoder rows)."""
        if not self.unit_norm_decoder:
            return self
        return eqx.tree_at(lambda m: m.W_dec, self, self.W_dec / jnp.maximum(self.decoder_norms()[:, None], 1e-12))

    def project_decoder_grad(self, grad_W_dec):
        """Remove from the decoder gradient its component along each (unit-norm) row."""
        if not self.unit_norm_decoder:
            return grad_W_dec
        w = self.W_dec / jnp.maximum(self.decoder_norms()[:, None], 1e-12)
        return grad_W_dec - jnp.sum(grad_W_dec * w, -1, keepdims=True) * w

    def decoder_norms(self) -> Float[Array, " width"]:
        return jnp.linalg.norm(self.W_dec, axis=-1)

    def config(self) -> dict:
        """Static, JSON-able description (architecture-specific keys added by subclasses)."""
        return dict(arch=self.arch, d_in=self.d_in, width=self.width, site=self.site, layer=self.layer,
                    target=self.target, skip=self.W_skip is not None)


def _sq(err):
    """mean over the batch of the squared error summed over the model dimension."""
    return jnp.mean(jnp.sum(jnp.square(err), -1))


def _goal(xn, yn):
    """What the decoder must produce: the input (an SAE) or the target (a transcoder)."""
    return xn if yn is None else yn


def _auxk_loss(sae, xn, pre, err, dead, aux_k: int, max_dead: int = 0):
    """AuxK (Gao et al. 2024): reconstruct the residual error from the `aux_k` largest pre-activations of
    dead latents, normalised by the error's variance. Zero (and skipped) when no latent is dead.

    For speed the candidates are the `max_dead` dead latents (default max(4 aux_k, 1024)) with the largest
    pre-activation in the batch, encoded and decoded with one dense [n, M] matmul each; when fewer latents are
    dead this is exact. `pre` (stop-gradient) selects; the values, and so the gradients, come from `xn`."""
    width = pre.shape[-1]
    M = min(width, max_dead or max(4 * aux_k, 1024))
    kk = min(aux_k, M)

    def compute(_):
        score = jnp.where(dead, pre.max(0), -jnp.inf)
        _, cand = jax.lax.top_k(score, M)  # the most promising dead latents
        ok = jnp.take(dead, cand)
        p = jnp.where(ok, jnp.take(pre, cand, axis=1), -jnp.inf)  # [B, M]
        picked, idx = jax.lax.top_k(p, kk)
        values = xn @ jnp.take(sae.W_enc, cand, axis=1) + jnp.take(sae.enc_bias(), cand)  # the candidates' pre-activations [B, M]
        vals = jnp.where(jnp.isfinite(picked), jax.nn.relu(jnp.take_along_axis(values, idx, 1)), 0.0)
        err_hat = _scatter(vals, idx, M) @ jnp.take(sae.W_dec, cand, axis=0)
        target = jax.lax.stop_gradient(err)
        num = _sq(target - err_hat)
        den = _sq(target - target.mean(0))
        return num / jnp.maximum(den, 1e-12)

    # rematerialised: otherwise the cond's backward keeps the taken branch's intermediates and materialises
    # zeros of their size on the steps where no latent is dead
    return jax.lax.cond(jnp.any(dead), jax.checkpoint(compute), lambda _: jnp.zeros((), pre.dtype), None)


# ----------------------------------------------------------------------------- sparse encode / decode (TopK, BatchTopK)
#
# Entries come in `m` slots of `c` (arrays [m, c]): entry (j, e) pairs latent `cols[j, e]` with batch row
# `rows[j, e]`; `rows=None` means row e (TopK: slot j holds every token's j-th latent). The loops below touch
# [c, d_in] rows of a table per slot: a one-shot gather would materialise [m, c, d_in] (on CPU that costs far
# more than the arithmetic), and its autodiff transpose is a scatter fused with the products, slower still.

_UNROLL = 8  # slots per loop iteration (measured on CPU: 2.5x faster than 1, nothing gained beyond)


def _take(a, idx):
    """`a[idx]` along the first axis, for indices known to be in range (from top_k or `flat % width`)."""
    return a.at[idx].get(mode="promise_in_bounds")


def _slots(body, init, m: int):
    return jax.lax.fori_loop(0, m, body, init, unroll=min(_UNROLL, m))


def _combine(table, vals, cols, rows, n_rows: int):
    """`out[rows[j, e]] += vals[j, e] * table[cols[j, e]]` -> [n_rows, d_in]."""
    def body(j, acc):
        contrib = vals[j][:, None] * _take(table, cols[j])
        return acc + contrib if rows is None else acc.at[rows[j]].add(contrib, mode="promise_in_bounds")

    return _slots(body, jnp.zeros((n_rows, table.shape[1]), table.dtype), vals.shape[0])


def _dots(table, x, cols, rows):
    """`out[j, e] = x[rows[j, e]] . table[cols[j, e]]` -> [m, c]."""
    def body(j, acc):
        xj = x if rows is None else _take(x, rows[j])
        return acc.at[j].set(jnp.sum(xj * _take(table, cols[j]), -1))

    return _slots(body, jnp.zeros(cols.shape, table.dtype), cols.shape[0])


def _outer(vals, x, cols, rows, n_table: int):
    """`out[cols[j, e]] += vals[j, e] * x[rows[j, e]]` -> [n_table, d_in] (a table's gradient)."""
    def body(j, acc):
        xj = x if rows is None else _take(x, rows[j])
        return acc.at[cols[j]].add(vals[j][:, None] * xj, mode="promise_in_bounds")

    return _slots(body, jnp.zeros((n_table, x.shape[1]), x.dtype), vals.shape[0])


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def sparse_decode(W_dec, vals, cols, rows, n_rows: int):
    """Decode entries: `out[rows[j, e]] += vals[j, e] * W_dec[cols[j, e]]`, [m, c] -> [n_rows, d_in] (no b_dec)."""
    return _combine(W_dec, vals, cols, rows, n_rows)


sparse_decode.defvjp(
    lambda W_dec, vals, cols, rows, n_rows: (_combine(W_dec, vals, cols, rows, n_rows), (W_dec, vals, cols, rows)),
    lambda n_rows, res, g: (_outer(res[1], g, res[2], res[3], res[0].shape[0]), _dots(res[0], g, res[2], res[3]),
                            None, None))


def sparse_encode(W_enc_t, x, cols, rows, known=None):
    """Encoder pre-activations at entries only: `out[j, e] = x[rows[j, e]] . W_enc_t[cols[j, e]]` with the
    transposed encoder `W_enc_t [width, d_in]`, -> [m, c] (no biases). Its weight gradient touches only the
    entries' latents, instead of the [d_in, width] matmul the dense pre-activations' gradient costs.
    `known`: these values when the caller has them (from the dense pre-activations it selected on): returned
    as they are, with the same gradients, so the forward costs nothing."""
    known = _dots(W_enc_t, x, cols, rows) if known is None else known
    return _with_encoder_grad(jax.lax.stop_gradient(known), W_enc_t, x, cols, rows)


@jax.custom_vjp
def _with_encoder_grad(values, W_enc_t, x, cols, rows):
    return values


_with_encoder_grad.defvjp(
    lambda values, W_enc_t, x, cols, rows: (values, (W_enc_t, x, cols, rows)),
    lambda res, g: (None, _outer(g, res[1], res[2], res[3], res[0].shape[0]),
                    _combine(res[0], g, res[2], res[3], res[1].shape[0]), None, None))


def _scatter(vals, idx, width):
    """Dense [B, width] from [B, k] values at indices."""
    rows = jnp.arange(vals.shape[0])[:, None]
    return jnp.zeros((vals.shape[0], width), vals.dtype).at[rows, idx].set(vals)


# ----------------------------------------------------------------------------- the architectures

ARCHS: dict[str, type[SAE]] = {}  # arch name -> its final class, filled by `register_arch`


def register_arch(cls: type[SAE]) -> type[SAE]:
    """Class decorator: `cls` joins `ARCHS` under `cls.arch` (`init`, `from_arrays` and the file formats then
    know it). A new architecture is one final `SAE` subclass with `arch`, `activate` (and `loss` when its
    sparsity term is not L1-free), `fresh_fields`/`fields_from` for its own arrays, and this decorator."""
    if not cls.arch or cls.arch in ARCHS:
        raise ValueError(f"register_arch: {cls.__name__}.arch {cls.arch!r} is empty or taken")
    ARCHS[cls.arch] = cls
    return final(cls)



@register_arch
class ReLUSAE(SAE):
    """ReLU SAE, L1 penalty weighted by decoder norms (Anthropic's April 2024 update; SAELens 'standard')."""

    arch: ClassVar[str] = "relu"

    def activate(self, pre, xn=None):
        return jax.nn.relu(pre)

    def loss(self, xn, coeff, dead, aux_coeff=1 / 32, aux_k=0, aux_batch=0, yn=None):
        f = jax.nn.relu(self.pre_acts(xn))
        x_hat = f @ self.W_dec + self.b_dec + self.skip(xn)
        recon = _sq(_goal(xn, yn) - x_hat)
        sparsity = jnp.mean(jnp.sum(f * self.decoder_norms(), -1))
        return recon + coeff * sparsity, self._aux(f, x_hat, recon, sparsity, 0.0)


@register_arch
class TopKSAE(SAE):
    """TopK SAE (Gao et al. 2024): the k largest ReLU'd pre-activations per token; AuxK for dead latents."""

    k: int = eqx.field(static=True)
    arch: ClassVar[str] = "topk"
    unit_norm_decoder: ClassVar[bool] = True

    @classmethod
    def fresh_fields(cls, width, dtype, *, k, bandwidth, threshold):
        return dict(k=int(k))

    @classmethod
    def fields_from(cls, arrays, *, k, bandwidth):
        return dict(k=int(k))

    def select(self, pre):
        vals, idx = jax.lax.top_k(pre, self.k)
        return jax.nn.relu(vals), idx

    def activate(self, pre, xn=None):
        lead = pre.shape[:-1]
        vals, idx = self.select(pre.reshape(-1, self.width))
        return _scatter(vals, idx, self.width).reshape(*lead, self.width)

    def loss(self, xn, coeff, dead, aux_coeff=1 / 32, aux_k=0, aux_batch=0, yn=None):
        pre = jax.lax.stop_gradient(self.pre_acts(xn))
        idx = self.select(pre)[1]
        cols = idx.T  # [k, B]: slot j holds each token's j-th latent
        vals = jax.nn.relu(self.pre_acts_at(xn, cols, known=jnp.take_along_axis(pre, idx, 1).T))
        x_hat = sparse_decode(self.W_dec, vals, cols, None, xn.shape[0]) + self.b_dec + self.skip(xn)
        err = _goal(xn, yn) - x_hat
        recon = _sq(err)
        n = aux_batch or xn.shape[0]
        auxk = (_auxk_loss(self, xn[:n], pre[:n], err[:n], dead, aux_k or self.d_in // 2)
                if aux_coeff else 0.0)
        fires = jnp.zeros((self.width,), jnp.int32).at[cols.reshape(-1)].add((vals > 0).reshape(-1).astype(jnp.int32))
        l0 = (vals > 0).sum(0).mean()
        return recon + aux_coeff * auxk, dict(recon=recon, sparsity=0.0, auxk=auxk, fires=fires, l0=l0, x_hat=x_hat)

    def config(self):
        return {**super().config(), "k": self.k}


@register_arch
class BatchTopKSAE(SAE):
    """BatchTopK (Bussmann et al. 2024): in training the k*batch largest ReLU'd pre-activations over the whole
    batch are kept; at inference a feature is active where its pre-activation exceeds `threshold`, the running
    mean of the smallest value kept in training batches (`update_buffers`, after each training step)."""

    threshold: Float[Array, ""]
    k: int = eqx.field(static=True)
    arch: ClassVar[str] = "batchtopk"
    unit_norm_decoder: ClassVar[bool] = True
    buffers: ClassVar[tuple[str, ...]] = ("act_scale", "threshold")
    axes: ClassVar[dict[str, tuple[str, ...]]] = {**SAE.axes, "threshold": ()}

    @classmethod
    def fresh_fields(cls, width, dtype, *, k, bandwidth, threshold):
        return dict(threshold=jnp.asarray(-1.0, jnp.float32), k=int(k))

    @classmethod
    def fields_from(cls, arrays, *, k, bandwidth):
        return dict(threshold=arrays.get("threshold", jnp.asarray(-1.0)).reshape(()).astype(jnp.float32), k=int(k))

    def activate(self, pre, xn=None):
        return jnp.where(pre > self.threshold, pre, 0.0)

    def select(self, pre, per_row: int = 0):
        """Flat values and indices of the k*B largest ReLU'd pre-activations of a [B, width] batch.

        Exact and fast: the global top k*B is taken among each row's `per_row` (default 4k) largest values;
        if some row has all its candidates selected (it might hold more), the full flat top-k is used."""
        B, W = pre.shape
        n = self.k * B
        c = min(W, per_row or 4 * self.k)
        if c >= W:
            vals, flat = jax.lax.top_k(pre.reshape(-1), n)
            return jax.nn.relu(vals), flat
        cv, ci = jax.lax.top_k(pre, c)  # [B, c] candidates per row
        vals, pos = jax.lax.top_k(cv.reshape(-1), n)
        rows = pos // c
        flat = rows * W + jnp.take(ci.reshape(-1), pos)
        saturated = jnp.any(jnp.bincount(rows, length=B) >= c)

        def full(_):
            v, f = jax.lax.top_k(pre.reshape(-1), n)
            return v, f.astype(flat.dtype)

        vals, flat = jax.lax.cond(saturated, full, lambda _: (vals, flat), None)
        return jax.nn.relu(vals), flat

    def loss(self, xn, coeff, dead, aux_coeff=1 / 32, aux_k=0, aux_batch=0, yn=None):
        B = xn.shape[0]
        pre = jax.lax.stop_gradient(self.pre_acts(xn))
        flat = self.select(pre)[1].reshape(self.k, B)  # k*B entries in k slots of B
        rows, cols = flat // self.width, flat % self.width
        vals = jax.nn.relu(self.pre_acts_at(xn, cols, rows, known=_take(pre.reshape(-1), flat)))
        x_hat = sparse_decode(self.W_dec, vals, cols, rows, B) + self.b_dec + self.skip(xn)
        err = _goal(xn, yn) - x_hat
        recon = _sq(err)
        n = aux_batch or B
        auxk = _auxk_loss(self, xn[:n], pre[:n], err[:n], dead, aux_k or self.d_in // 2) if aux_coeff else 0.0
        kept = vals > 0
        fires = jnp.zeros((self.width,), jnp.int32).at[cols].add(kept.astype(jnp.int32))
        min_kept = jnp.min(jnp.where(kept, vals, jnp.inf))
        return recon + aux_coeff * auxk, dict(recon=recon, sparsity=0.0, auxk=auxk, fires=fires,
                                              l0=kept.sum() / B, x_hat=x_hat, min_kept=min_kept)

    def update_buffers(self, aux, threshold_lr):
        """The threshold moves to `aux["min_kept"]` by `threshold_lr` (set to it on the first step)."""
        old = self.threshold
        new = jnp.where(old < 0, aux["min_kept"], (1 - threshold_lr) * old + threshold_lr * aux["min_kept"])
        new = jnp.where(jnp.isfinite(new), new, old)
        return eqx.tree_at(lambda m: m.threshold, self, new.astype(old.dtype))

    def train_metrics(self):
        return {"threshold": self.threshold}

    def config(self):
        return {**super().config(), "k": self.k}


@register_arch
class JumpReLUSAE(SAE):
    """JumpReLU (Rajamanoharan et al. 2024; Gemma Scope): f = pre * H(pre - theta) with learned per-feature
    thresholds `threshold` (trained directly, clamped positive after each step, as SAELens does: a log
    parameterisation barely moves a small initial threshold), through the rectangle-kernel straight-through
    estimator with `bandwidth`, and an L0 penalty."""

    threshold: Float[Array, " width"]
    bandwidth: float = eqx.field(static=True)
    arch: ClassVar[str] = "jumprelu"
    axes: ClassVar[dict[str, tuple[str, ...]]] = {**SAE.axes, "threshold": ("features",)}
    unit_norm_decoder: ClassVar[bool] = True
    extra_arrays: ClassVar[tuple[str, ...]] = ("threshold",)

    @classmethod
    def fresh_fields(cls, width, dtype, *, k, bandwidth, threshold):
        return dict(threshold=jnp.full((width,), threshold, dtype), bandwidth=float(bandwidth))

    @classmethod
    def fields_from(cls, arrays, *, k, bandwidth):
        return dict(threshold=arrays["threshold"], bandwidth=float(bandwidth))

    def activate(self, pre, xn=None):
        return jumprelu(pre, self.threshold, self.bandwidth)

    def loss(self, xn, coeff, dead, aux_coeff=1 / 32, aux_k=0, aux_batch=0, yn=None):
        pre = self.pre_acts(xn)
        f = jumprelu(pre, self.threshold, self.bandwidth)
        x_hat = f @ self.W_dec + self.b_dec + self.skip(xn)
        recon = _sq(_goal(xn, yn) - x_hat)
        l0 = jnp.mean(jnp.sum(step(pre, self.threshold, self.bandwidth), -1))
        return recon + coeff * l0, self._aux(f, x_hat, recon, l0, 0.0)

    def constrain(self):
        sae = super().constrain()
        return eqx.tree_at(lambda m: m.threshold, sae, jnp.maximum(sae.threshold, 1e-6))

    def config(self):
        return {**super().config(), "bandwidth": self.bandwidth}


@register_arch
class GatedSAE(SAE):
    """Gated SAE (Rajamanoharan et al. 2024): a gate H(pi_gate) decides which features fire and a magnitude
    path with the same directions (W_mag = W_enc * exp(r_mag)) sets their size. `b_enc` is the gate bias
    (`b_gate` in SAELens files). Decoder rows are kept unit-norm as in the paper (with free norms the gate
    and magnitude paths trade scale and training is unstable: measured on planted dictionaries)."""

    r_mag: Float[Array, " width"]
    b_mag: Float[Array, " width"]
    arch: ClassVar[str] = "gated"
    axes: ClassVar[dict[str, tuple[str, ...]]] = {**SAE.axes, "r_mag": ("features",), "b_mag": ("features",)}
    unit_norm_decoder: ClassVar[bool] = True
    extra_arrays: ClassVar[tuple[str, ...]] = ("r_mag", "b_mag")

    @classmethod
    def fresh_fields(cls, width, dtype, *, k, bandwidth, threshold):
        return dict(r_mag=jnp.zeros((width,), dtype), b_mag=jnp.zeros((width,), dtype))

    @classmethod
    def fields_from(cls, arrays, *, k, bandwidth):
        return dict(r_mag=arrays["r_mag"], b_mag=arrays["b_mag"])

    def _paths(self, xn):
        centred = xn @ self.W_enc + (self.enc_bias() - self.b_enc)
        pi_gate = centred + self.b_enc
        pi_mag = centred * jnp.exp(self.r_mag) + self.b_mag
        return pi_gate, pi_mag

    def activate(self, pre, xn=None):
        pi_gate, pi_mag = self._paths(xn)
        return jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0.0)

    @jax.named_scope("sae.encode")
    def encode(self, x):
        return self.activate(None, x * self.act_scale)

    def loss(self, xn, coeff, dead, aux_coeff=1 / 32, aux_k=0, aux_batch=0, yn=None):
        pi_gate, pi_mag = self._paths(xn)
        f = jnp.where(pi_gate > 0, jax.nn.relu(pi_mag), 0.0)
        skip = self.skip(xn)
        x_hat = f @ self.W_dec + self.b_dec + skip
        goal = _goal(xn, yn)
        recon = _sq(goal - x_hat)
        gate = jax.nn.relu(pi_gate)
        sparsity = jnp.mean(jnp.sum(gate * self.decoder_norms(), -1))
        aux_hat = gate @ jax.lax.stop_gradient(self.W_dec) + jax.lax.stop_gradient(self.b_dec + skip)
        aux_recon = _sq(goal - aux_hat)
        return recon + coeff * sparsity + aux_recon, self._aux(f, x_hat, recon, sparsity, aux_recon)


def _layer(layer) -> int | None:
    """`None` for no layer; files written before `models.Hook` hold -1 for it."""
    return None if layer is None or int(layer) < 0 else int(layer)


def init(arch: str, d_in: int, width: int, key, *, site: str = "", layer: int | None = None, k: int = 32,
         bandwidth: float = 0.05, threshold: float = 0.01, decoder_norm: float | None = None,
         dtype=jnp.float32, target: str | None = None, skip: bool = False) -> SAE:
    """A fresh SAE (a transcoder predicting site `target` of the same layer, when given; with `skip`, a skip
    transcoder whose linear path `W_skip [d_in, d_in]` starts at zero, as circuit-tracer's): decoder rows random
    directions (unit norm, or `decoder_norm`; ReLU/Gated default 0.1 as in Anthropic's recipe), encoder
    initialised as the decoder's transpose, biases zero (set `b_dec` from the data with
    `saes.train.state.calibrate`), `act_scale = 1`."""
    if arch not in ARCHS:
        raise ValueError(f"unknown SAE architecture {arch!r}; known: {', '.join(ARCHS)}")
    if skip and not target:
        raise ValueError("skip=True needs a target: a skip connection is a transcoder's (input -> target)")
    cls = ARCHS[arch]
    if decoder_norm is None:
        decoder_norm = 1.0 if cls.unit_norm_decoder else 0.1
    W_dec = jax.random.normal(key, (width, d_in), jnp.float32)
    W_dec = W_dec / jnp.linalg.norm(W_dec, axis=-1, keepdims=True) * decoder_norm
    common = dict(W_enc=W_dec.T.astype(dtype), b_enc=jnp.zeros((width,), dtype), W_dec=W_dec.astype(dtype),
                  b_dec=jnp.zeros((d_in,), dtype), act_scale=jnp.ones((), jnp.float32),
                  W_skip=jnp.zeros((d_in, d_in), dtype) if skip else None, site=site, layer=_layer(layer),
                  target=target or None)
    return cls(**common, **cls.fresh_fields(width, dtype, k=k, bandwidth=bandwidth, threshold=threshold))


def from_arrays(arch: str, arrays: dict, *, site: str = "", layer: int | None = None, k: int = 32,
                bandwidth: float = 0.05, target: str | None = None) -> SAE:
    """Build an SAE of `arch` from named arrays (our names; missing `act_scale` means 1, missing `W_skip` none)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown SAE architecture {arch!r}; known: {', '.join(ARCHS)}")
    cls = ARCHS[arch]
    a = {n: jnp.asarray(v) for n, v in arrays.items()}
    width = a["W_enc"].shape[1]
    common = dict(W_enc=a["W_enc"], b_enc=a.get("b_enc", jnp.zeros((width,), a["W_enc"].dtype)), W_dec=a["W_dec"],
                  b_dec=a["b_dec"], act_scale=a.get("act_scale", jnp.ones((), jnp.float32)).astype(jnp.float32).reshape(()),
                  W_skip=a.get("W_skip"), site=site, layer=_layer(layer), target=target or None)
    return cls(**common, **cls.fields_from(a, k=k, bandwidth=bandwidth))


def arrays(sae: SAE) -> dict[str, np.ndarray]:
    """Named numpy arrays of an SAE (our names, the inverse of `from_arrays`)."""
    return {f.name: np.asarray(getattr(sae, f.name)) for f in sae.__dataclass_fields__.values()
            if eqx.is_array(getattr(sae, f.name))}


# the shape of each array of ours in `check_arrays`, over d_in ("d") and width ("w")
ARRAY_SHAPES = {"W_enc": ("d", "w"), "W_dec": ("w", "d"), "b_enc": ("w",), "b_dec": ("d",), "act_scale": (),
                "r_mag": ("w",), "b_mag": ("w",), "W_skip": ("d", "d")}


def check_arrays(where, arch: str, arrays: dict, *, k=32, site: str = "", layer=None, model=None, d_in=None,
                 width=None) -> None:
    """Raise an InputError naming `where` unless `arrays` (our names) make a consistent SAE of `arch`:
    `W_enc [d_in, width]`, `W_dec [width, d_in]`, `b_dec [d_in]`, `b_enc`/`threshold` (JumpReLU)/`r_mag`/`b_mag`
    `[width]`, scalar `act_scale` and BatchTopK `threshold`, a skip transcoder's `W_skip [d_in, d_in]`, all finite; `k` in [1, width] for TopK/BatchTopK;
    `d_in`/`width` (from the file's metadata) equal to the arrays'; with `model`, `site` a site of
    `models.sites` whose width is `d_in` and `layer` inside the model."""
    missing = sorted({"W_enc", "W_dec", "b_dec", *ARCHS[arch].extra_arrays} - set(arrays))
    if missing:
        raise InputError(f"{where}: a {arch} SAE needs arrays {missing}, which the file lacks (has {sorted(arrays)})")
    enc = np.shape(arrays["W_enc"])
    if len(enc) != 2:
        raise InputError(f"{where}: W_enc must be [d_in, width], got shape {enc}")
    dims = {"d": enc[0], "w": enc[1]}
    shapes = {**ARRAY_SHAPES, "threshold": () if arch == "batchtopk" else ("w",)}
    for name, a in arrays.items():
        if name not in shapes:
            continue
        want = tuple(dims[x] for x in shapes[name])
        got = np.shape(a)
        if got != want and not (want == () and int(np.prod(got)) == 1):
            raise InputError(f"{where}: {name} has shape {got}, expected {want} for W_enc {enc} "
                             f"([d_in, width]); the arrays do not belong to one SAE")
        if not np.all(np.isfinite(np.asarray(a, np.float32))):
            raise InputError(f"{where}: {name} holds non-finite values (NaN or Inf)")
    for name, value, have in (("d_in", d_in, enc[0]), ("width", width, enc[1])):
        if value is not None and value != have:
            raise InputError(f"{where}: the metadata says {name}={value} but the arrays have {name}={have}")
    if arch in ("topk", "batchtopk") and not (isinstance(k, int) and 1 <= k <= enc[1]):
        raise InputError(f"{where}: k={k!r} must be an integer in [1, width={enc[1]}]")
    if model is None:
        return
    cfg = getattr(model, "cfg", model)
    if site not in SITES:
        raise InputError(f"{where}: the SAE's site {site!r} is not a model site, so it cannot be checked against "
                         "the model")
    if site_width(cfg, site) != enc[0]:
        raise InputError(f"{where}: d_in={enc[0]} but the model's {site!r} has width {site_width(cfg, site)}")
    if SITES[site].per_layer and not (isinstance(layer, int) and 0 <= layer < cfg.n_layers):
        raise InputError(f"{where}: layer {layer!r} is outside the model's {cfg.n_layers} layers")
