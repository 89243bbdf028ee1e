"""Cross-layer transcoders (Ameisen et al. 2025): each layer's features read that layer's input site
(`ln2.normalized` or `resid_mid`) and write into the MLP outputs of that layer and of every later one.

    clt = saes.core.cross_layer.init("relu", n_layers=30, d_in=576, width=512, key=jax.random.key(0))
    f = clt.encode(x)                   # x [..., L, D] every layer's input -> [..., L, W]
    y_hat = clt.decode(f)               # [..., L, D]: layer t's MLP output predicted from the features of layers <= t
    logits = clt.replaced_logits(m, tokens)        # every MLP replaced, the features' effects carried forward
    graph = saes.circuits.attribution.attribute(m, clt, tokens)             # attribution graphs take a CLT as a set
    saes.io.formats.save_clt(clt, "runs/x/clt"); saes.io.circuit_tracer.write(clt, "export/")   # files: saes.io

Arrays: `W_enc [L, D, W]`, `b_enc [L, W]`, `W_dec [L, W, L, D]` (source layer, feature, target layer;
entries with target < source are zero and never used: the layout of Gemma Scope 2's CLTs), `b_dec [L, D]`
(per target layer), JumpReLU `threshold [L, W]`, and `act_scale [L, 1]`: layer l's input and target are
multiplied by `act_scale[l]` in training (it broadcasts over `[..., L, D]`), `fold_scale` bakes it in.
Pre-activations are `xn @ W_enc + b_enc` (inputs are not centred: `b_dec` lives in the targets' space).

Training is the SAE trainer's (`TrainConfig(cross_layer=True, site=("ln2.normalized",), target="mlp_out",
layers=every layer)`): one dictionary for all layers, trained jointly on every layer's target in one pass, the
loss summed over layers. Activations: `relu` (L1 weighted by each feature's total decoder norm over its target
layers), `jumprelu` (L0 with the rectangle-kernel straight-through estimator) and `topk` (k per token and
layer). Decoders are free (no unit-norm constraint); `topk` has no AuxK term here.
"""

from __future__ import annotations

from typing import ClassVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float


from models.checks import check_tokens
from models.errors import InputError
from models.sites import SITES, Hook
from models.transformer import default_positions, embed, layer_forward, norm, unembed
from saes.core.dictionary import Dictionary, Replacement, site_width
from saes.core.evaluate import replacement_ce
from saes.core.sae import _scatter, jumprelu, sparse_decode, step

__all__ = ["ARCHS", "ARRAY_SHAPES", "CrossLayerTranscoder", "from_arrays", "init", "random_clt", "replaced_run"]

ARCHS = ("relu", "jumprelu", "topk")


@final
class CrossLayerTranscoder(Dictionary, Replacement):
    """One dictionary per layer whose features decode into the targets of their layer and every later one;
    see the module docstring for the arrays."""

    W_enc: Float[Array, "L D W"]
    b_enc: Float[Array, "L W"]
    W_dec: Float[Array, "L W L D"]
    b_dec: Float[Array, "L D"]
    act_scale: Float[Array, "L 1"]
    threshold: Float[Array, "L W"] | None
    arch: str = eqx.field(static=True)
    site: str = eqx.field(static=True)
    target: str = eqx.field(static=True)
    k: int = eqx.field(static=True, default=32)
    bandwidth: float = eqx.field(static=True, default=0.05)

    # logical axes (`models.sharding.RULES`): split along features; W_dec's target-layer axis is unnamed (a logical
    # name may occur once per array, and layers are replicated anyway)
    axes: ClassVar[dict[str, tuple[str, ...]]] = {
        "W_enc": ("layers", "embed", "features"), "b_enc": ("layers", "features"),
        "W_dec": ("layers", "features", None, "embed"), "b_dec": ("layers", "embed"), "act_scale": ("layers", None),
        "threshold": ("layers", "features"),
    }

    def __check_init__(self):
        if self.arch not in ARCHS:
            raise InputError(f"unknown cross-layer transcoder activation {self.arch!r}; known: {', '.join(ARCHS)}")
        if (self.threshold is None) == (self.arch == "jumprelu"):
            raise InputError(f"a {self.arch} cross-layer transcoder {'needs' if self.arch == 'jumprelu' else 'has no'} "
                             "threshold")

    @property
    def n_layers(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[1]

    @property
    def width(self) -> int:
        return self.W_enc.shape[2]

    @property
    def latent_shape(self) -> tuple[int, int]:
        """The shape of per-latent statistics: `[L, W]`."""
        return (self.n_layers, self.width)

    @property
    def hook(self) -> str:
        """Its key in a training run (and its directory under `saes/`): `clt`."""
        return "clt"

    def input_hooks(self) -> list[str]:
        return [Hook(self.site, layer).key for layer in range(self.n_layers)]

    def target_hooks(self) -> list[str]:
        return [Hook(self.target, layer).key for layer in range(self.n_layers)]

    def streams(self, batch: dict, hook: str = "clt") -> tuple[Array, Array]:
        """Every layer's input and target stacked `[N, L, D]` from a batch of named streams `{hook: [N, D]}`."""
        return (jnp.stack([batch[h] for h in self.input_hooks()], 1),
                jnp.stack([batch[h] for h in self.target_hooks()], 1))

    def causal(self) -> Float[Array, "L L"]:
        """`[source, target]`: 1 where a source layer's features write to the target layer (target >= source)."""
        return jnp.triu(jnp.ones((self.n_layers, self.n_layers), jnp.float32))

    # -- the function
    def pre_acts(self, xn: Float[Array, "... L D"]) -> Float[Array, "... L W"]:
        return jnp.einsum("...ld,ldw->...lw", xn, self.W_enc) + self.b_enc

    def activate(self, pre: Float[Array, "... L W"]) -> Float[Array, "... L W"]:
        return self._activate(pre, self.threshold)

    def _activate(self, pre, threshold):
        if self.arch == "relu":
            return jax.nn.relu(pre)
        if self.arch == "jumprelu":
            return jumprelu(pre, threshold, self.bandwidth)
        lead = pre.shape[:-1]
        vals, idx = jax.lax.top_k(pre.reshape(-1, self.width), self.k)
        return _scatter(jax.nn.relu(vals), idx, self.width).reshape(*lead, self.width)

    def _check_index(self, name: str, value, bound: int) -> None:
        """InputError for concrete indices outside [0, bound) (traced ones cannot be checked here)."""
        if not isinstance(value, jax.core.Tracer):
            v = np.asarray(value)
            if v.size and (v.min() < 0 or v.max() >= bound):
                raise InputError(f"cross-layer transcoder: {name} {v.tolist()} outside [0, {bound})")

    def _check_width(self, name: str, x, last: int, what: str) -> None:
        """InputError unless `x`'s last axis is `last` (shapes are static, so this holds under `jit` too)."""
        shape = np.shape(x)
        if not shape or shape[-1] != last:
            raise InputError(f"cross-layer transcoder: {name} has shape {tuple(shape)}, expected a last axis of "
                             f"{what}={last}")

    @jax.named_scope("clt.layer_encode")
    def layer_encode(self, x: Float[ArrayLike, "... D"], layer) -> Float[Array, "... W"]:
        """Feature activations of one layer (`layer` may be traced) from its raw input; a traced `layer` outside
        [0, n_layers) gives NaN features (never a clamped neighbour's)."""
        self._check_index("layer", layer, self.n_layers)
        self._check_width("x", x, self.d_in, "d_in")
        ok = (layer >= 0) & (layer < self.n_layers)
        layer = jnp.clip(layer, 0, self.n_layers - 1)
        pre = (jnp.asarray(x, jnp.float32) * self.act_scale[layer]) @ self.W_enc[layer] + self.b_enc[layer]
        f = self._activate(pre, None if self.threshold is None else self.threshold[layer])
        return jnp.where(ok, f, jnp.nan)

    @jax.named_scope("clt.encode")
    def encode(self, x: Float[ArrayLike, "... L D"]) -> Float[Array, "... L W"]:
        """Feature activations of every layer's raw input."""
        if np.shape(x)[-2:] != (self.n_layers, self.d_in):
            raise InputError(f"cross-layer transcoder: x has shape {tuple(np.shape(x))}, expected [..., n_layers="
                             f"{self.n_layers}, d_in={self.d_in}]")
        return self.activate(self.pre_acts(x * self.act_scale))

    def causal_W_dec(self) -> Float[Array, "L W L D"]:
        """`W_dec` with the entries below each source layer zeroed (writes go forward only)."""
        return self.W_dec * self.causal()[:, None, :, None]

    def decode_normalised(self, f: Float[Array, "... L W"]) -> Float[Array, "... L D"]:
        return jnp.einsum("...sw,swtd->...td", f, self.causal_W_dec()) + self.b_dec

    @jax.named_scope("clt.decode")
    def decode(self, f: Float[ArrayLike, "... L W"]) -> Float[Array, "... L D"]:
        """Every layer's predicted target (raw scale): layer t's sums the features of layers <= t."""
        if np.shape(f)[-2:] != (self.n_layers, self.width):
            raise InputError(f"cross-layer transcoder: f has shape {tuple(np.shape(f))}, expected [..., n_layers="
                             f"{self.n_layers}, width={self.width}]")
        return self.decode_normalised(f) / self.act_scale

    def __call__(self, x: Float[ArrayLike, "... L D"]) -> Float[Array, "... L D"]:
        return self.decode(self.encode(x))

    def decoder_vectors(self, layer, feature) -> Float[Array, "... L D"]:
        """Raw-scale decoder vectors of features (`layer`, `feature`: ints or `[n]` arrays) into every target
        layer (zero below the source layer)."""
        self._check_index("layer", layer, self.n_layers)
        self._check_index("feature", feature, self.width)
        return self.W_dec[layer, feature] * self.causal()[layer][..., None] / self.act_scale

    # -- the replacement interface (`saes.core.dictionary.Replacement`): a CLT is its own
    @property
    def replacement(self) -> "CrossLayerTranscoder":
        return self

    def scales(self) -> Float[Array, " L"]:
        return self.act_scale.reshape(self.n_layers)

    def pre_acts_layers(self, x: Float[Array, "L ... D"]) -> Float[Array, "L ... W"]:
        return jnp.moveaxis(self.pre_acts(jnp.moveaxis(x, 0, -2) * self.act_scale), -2, 0)

    def encode_layers(self, x: Float[Array, "L ... D"]) -> Float[Array, "L ... W"]:
        return jnp.moveaxis(self.encode(jnp.moveaxis(x, 0, -2)), -2, 0)

    def predict_layers(self, acts: Float[Array, "L ... W"], x=None) -> Float[Array, "L ... D"]:
        return jnp.moveaxis(self.decode(jnp.moveaxis(acts, 0, -2)), -2, 0)

    def encoder_rows(self, layer, feature) -> np.ndarray:
        """Host-side: `W_enc[layer, :, feature]` times the layer's input scale, `[n, D]`."""
        return np.asarray(self.W_enc)[layer, :, feature] * np.asarray(self.scales())[layer][:, None]

    def decoder_writes(self, layer, feature) -> Float[Array, "n L D"]:
        return self.decoder_vectors(layer, feature)

    def writes(self, layer, feature):
        """Host-side: one write per (feature, target layer >= its own), by feature then target."""
        owner, target = np.nonzero(np.arange(self.n_layers)[None, :] >= np.asarray(layer)[:, None])
        return owner, target, np.asarray(self.W_dec)[layer[owner], feature[owner], target]

    def replaced_run(self, model, tokens, error=None, skip_first: int = 1, edits=None, interventions=()):
        return replaced_run(model, self, tokens, error, skip_first, edits, interventions)

    # -- training (the `saes.core.dictionary.Dictionary` protocol that `saes.train.step` uses)
    def decoder_norms(self) -> Float[Array, "L W"]:
        """Each feature's decoder norm over all the layers it writes to."""
        return jnp.sqrt(jnp.einsum("swtd,st->sw", jnp.square(self.W_dec), self.causal()))

    def loss(self, xn, coeff, dead, aux_coeff: float = 0.0, aux_k: int = 0, aux_batch: int = 0, yn=None):
        """`(loss, aux)` on normalised inputs and targets `[B, L, D]`: the squared error summed over layers and
        the model dimension (mean over the batch) plus the sparsity term. `aux["l0"]` is per layer (the mean
        over layers of the features active per token); `fires [L, W]`."""
        if self.arch == "topk" and self.width >= 24 * self.k:
            return self._topk_loss(xn, yn)
        pre = self.pre_acts(xn)
        f = self.activate(pre)
        y_hat = self.decode_normalised(f)
        recon = jnp.mean(jnp.sum(jnp.square(yn - y_hat), (-2, -1)))
        if self.arch == "relu":
            sparsity = jnp.mean(jnp.sum(f * self.decoder_norms(), (-2, -1)))
        elif self.arch == "jumprelu":
            sparsity = jnp.mean(jnp.sum(step(pre, self.threshold, self.bandwidth), (-2, -1)))
        else:
            sparsity = jnp.zeros(())
        active = f > 0
        aux = dict(recon=recon, sparsity=sparsity, auxk=0.0, fires=active.sum(0, dtype=jnp.int32),
                   l0=active.sum(-1).mean(), x_hat=y_hat)
        return recon + coeff * sparsity, aux

    def _topk_loss(self, xn, yn):
        """TopK with a wide dictionary (W >= 24 k) decodes only the k active features of each (token, layer):
        each is one row of the decoder seen as a table `[L * W, L * D]` (`saes.core.sae.sparse_decode`), k*L rows per
        token instead of the dense `[L, W] x [L, W, L, D]` contraction. Measured on SmolLM2's shape (L = 30,
        D = 576, k = 8, 2-core CPU, loss and gradient): W = 1024, 256 tokens: 2.5 s vs 20.5 s dense; W = 128,
        1024 tokens: 5.4 s vs 3.9 s (the rows are L*D wide: memory traffic, not FLOPs, decides). Entries below
        the source layer are zero (`constrain` keeps them so after every step), so the table needs no mask."""
        B, L, W, D = xn.shape[0], self.n_layers, self.width, self.d_in
        vals, idx = jax.lax.top_k(self.pre_acts(xn), self.k)  # [B, L, k]
        vals = jax.nn.relu(vals)
        cols = (jnp.arange(L)[:, None] * W + idx).reshape(B, L * self.k).T  # [L*k, B]: slot j, token b
        y_hat = sparse_decode(self.W_dec.reshape(L * W, L * D), vals.reshape(B, L * self.k).T, cols, None,
                              B).reshape(B, L, D) + self.b_dec
        recon = jnp.mean(jnp.sum(jnp.square(yn - y_hat), (-2, -1)))
        on = vals > 0
        fires = jnp.zeros((L * W,), jnp.int32).at[cols.T.reshape(-1)].add(on.reshape(-1).astype(jnp.int32))
        aux = dict(recon=recon, sparsity=0.0, auxk=0.0, fires=fires.reshape(L, W), l0=on.sum((-2, -1)).mean() / L,
                   x_hat=y_hat)
        return recon, aux

    def constrain(self) -> "CrossLayerTranscoder":
        """Decoder entries below their source layer stay zero; JumpReLU thresholds stay positive."""
        out = eqx.tree_at(lambda m: m.W_dec, self, self.causal_W_dec())
        if self.arch == "jumprelu":
            out = eqx.tree_at(lambda m: m.threshold, out, jnp.maximum(out.threshold, 1e-6))
        return out

    def fold_scale(self) -> "CrossLayerTranscoder":
        """The same function of raw activations with `act_scale` baked into the weights."""
        s = self.act_scale  # [L, 1]
        return eqx.tree_at(lambda m: (m.W_enc, m.W_dec, m.b_dec, m.act_scale), self,
                           (self.W_enc * s[:, :, None], self.W_dec / s[None, None], self.b_dec / s, jnp.ones_like(s)))

    def config(self) -> dict:
        return dict(kind="cross_layer_transcoder", arch=self.arch, n_layers=self.n_layers, d_in=self.d_in,
                    width=self.width, site=self.site, target=self.target, k=self.k, bandwidth=self.bandwidth)

    # -- on a model
    def check(self, cfg) -> None:
        """InputError unless the CLT fits the model config (its layers, its sites' width)."""
        if self.n_layers != cfg.n_layers:
            raise InputError(f"the cross-layer transcoder has {self.n_layers} layers, the model {cfg.n_layers}")
        for name in (self.site, self.target):
            if site_width(cfg, name) != self.d_in:
                raise InputError(f"the cross-layer transcoder has d_in {self.d_in}, the model's {name!r} has width "
                                 f"{site_width(cfg, name)}")

    def replaced_logits(self, model, tokens, error=None, keep_first: bool = True, edits=None):
        """Logits `[B, T, V]` with every layer's MLP output replaced by this CLT's prediction, layer by layer
        (a feature's writes into later layers are carried forward, so a change at layer l reaches every later
        layer's features), plus `error [L, B, T, D]` when given (the real output minus the prediction: with it
        the model is reproduced exactly). `keep_first`: the first position keeps its real MLP output (CLTs
        are not trained on it). `edits` (`saes.circuits.feature_effects.FeatureEdits`) set features' activations."""
        cfg = model.cfg
        self.check(cfg)
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or tokens.size == 0 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise InputError(f"replaced_logits: tokens must be integer ids [B, T], got shape {tokens.shape} dtype {tokens.dtype}")
        check_tokens(tokens, cfg.vocab_size)
        if tokens.shape[1] > cfg.n_ctx:
            raise InputError(f"replaced_logits: {tokens.shape[1]} positions, more than the model's context of {cfg.n_ctx}")
        want = (self.n_layers, *tokens.shape, self.d_in)
        if error is not None and tuple(jnp.shape(error)) != want:
            raise InputError(f"replaced_logits: error has shape {tuple(jnp.shape(error))}, expected [L, B, T, D] = {want}")
        if edits is not None:
            edits.check(self.n_layers, tokens.shape[1], self.width, int(keep_first))
        return _replaced_logits(model, self, tokens, error, keep_first, edits)

    def ce_metrics(self, model, tokens, mask=None) -> dict[str, float]:
        """Next-token CE clean, with every MLP replaced (`replaced_logits`), and with every MLP zero-ablated;
        CE recovered and the KLs, as `saes.core.transcoders.TranscoderSet.ce_metrics` reports them."""
        tokens = jnp.asarray(tokens)
        if mask is not None and not bool(jnp.all(jnp.asarray(mask) > 0)):
            raise InputError("CrossLayerTranscoder.ce_metrics: padded rows are not supported; give unpadded rows")
        return replacement_ce(model, tokens, jnp.ones_like(tokens), self.replaced_logits(model, tokens), self.target)



@eqx.filter_jit
def _replaced_logits(model, clt: CrossLayerTranscoder, tokens, error, keep_first: bool, edits):
    resid, _ = replaced_run(model, clt, tokens, error, int(keep_first), edits)
    return unembed(model.params, norm(resid, model.params["ln_final"], model.cfg), model.cfg).astype(jnp.float32)


def replaced_run(model, clt: CrossLayerTranscoder, tokens, error=None, skip_first: int = 1, edits=None,
                 interventions=()) -> tuple[Float[Array, "B T D"], Float[Array, "L B T D"]]:
    """The replacement forward of unpadded `tokens [B, T]` up to the last layer's `resid_post` (returned with
    every layer's input site `[L, B, T, D]`): layer by layer (`models.transformer.layer_forward` in a
    `fori_loop`), each layer's feature writes into the later layers carried forward (`future [L, B, T, D]`,
    normalised by the target's scale). Positions < `skip_first` keep their real MLP output and have no
    features; `interventions` run in every layer too (held patterns and norms: the local replacement model)."""
    params, cfg = model.params, model.cfg
    B, T = tokens.shape
    mask = jnp.ones((B, T), jnp.int32)
    positions = default_positions(mask)
    write = _Write(clt, jnp.zeros((clt.n_layers, B, T, clt.d_in), jnp.float32), error, edits, skip_first,
                   clt.target, clt.site)

    def layer_step(layer, carry):
        resid, write, inputs = carry
        resid, acts = layer_forward(params, cfg, layer, resid, mask, positions, (clt.site,), (*interventions, write))
        later = (jnp.arange(clt.n_layers) > layer)[:, None, None, None]
        writes = jnp.einsum("btw,wsd->sbtd", write.features(acts[clt.site], layer, positions), clt.W_dec[layer])
        inputs = jax.lax.dynamic_update_index_in_dim(inputs, acts[clt.site].astype(jnp.float32), layer, 0)
        return resid, eqx.tree_at(lambda w: w.future, write, write.future + writes * later), inputs

    init = (embed(params, tokens, positions, cfg), write, jnp.zeros((clt.n_layers, B, T, clt.d_in), jnp.float32))
    resid, _, inputs = jax.lax.fori_loop(0, clt.n_layers, layer_step, init)
    return resid, inputs


class _Write(eqx.Module):
    """At `site` (mlp_out) of the running layer: the writes of earlier layers' features (`future`) plus this
    layer's own (features of `ctx.seen[source]`, `edits` applied), plus the error; positions < `skip_first`
    keep their real value (and have no features)."""

    clt: CrossLayerTranscoder
    future: Array
    error: Array | None
    edits: eqx.Module | None
    skip_first: int = eqx.field(static=True)
    site: str = eqx.field(static=True)
    source: str = eqx.field(static=True)

    def features(self, x, layer, positions):
        f = self.clt.layer_encode(x, layer)
        f = f if self.edits is None else self.edits.apply(f, layer)
        return jnp.where((positions < self.skip_first)[..., None], 0.0, f)

    def apply(self, value, ctx):
        layer, clt = ctx.layer, self.clt
        f = self.features(ctx.seen[self.source], layer, ctx.positions)
        new = (self.future[layer] + f @ clt.W_dec[layer, :, layer] + clt.b_dec[layer]) / clt.act_scale[layer]
        if self.error is not None:
            new = new + self.error[layer]
        new = jnp.where((ctx.positions < self.skip_first)[..., None], value.astype(jnp.float32), new)
        return new.astype(value.dtype)


def init(arch: str, n_layers: int, d_in: int, width: int, key, *, site: str = "ln2.normalized",
         target: str = "mlp_out", k: int = 32, bandwidth: float = 0.05, threshold: float = 0.01,
         decoder_norm: float | None = None) -> CrossLayerTranscoder:
    """A fresh CLT: every (source, feature, target) decoder vector a random direction of norm `decoder_norm`
    (default 0.1 for ReLU, else 1) divided by sqrt(number of targets of its source layer), each layer's encoder
    the transpose of its same-layer decoder, biases zero, `act_scale` 1."""
    if arch not in ARCHS:
        raise InputError(f"unknown cross-layer transcoder activation {arch!r}; known: {', '.join(ARCHS)}")
    for name in (site, target):
        if name not in SITES or not SITES[name].per_layer:
            raise InputError(f"a cross-layer transcoder reads and writes layer sites of models.sites, got {name!r}")
    norm = (0.1 if arch == "relu" else 1.0) if decoder_norm is None else decoder_norm
    W = jax.random.normal(key, (n_layers, width, n_layers, d_in), jnp.float32)
    n_targets = n_layers - jnp.arange(n_layers, dtype=jnp.float32)
    W = W / jnp.linalg.norm(W, axis=-1, keepdims=True) * (norm / jnp.sqrt(n_targets))[:, None, None, None]
    W = W * jnp.triu(jnp.ones((n_layers, n_layers)))[:, None, :, None]
    W_enc = jnp.stack([W[layer, :, layer].T for layer in range(n_layers)])
    return CrossLayerTranscoder(
        W_enc=W_enc, b_enc=jnp.zeros((n_layers, width)), W_dec=W, b_dec=jnp.zeros((n_layers, d_in)),
        act_scale=jnp.ones((n_layers, 1)), threshold=jnp.full((n_layers, width), threshold) if arch == "jumprelu" else None,
        arch=arch, site=site, target=target, k=int(k), bandwidth=float(bandwidth))


def random_clt(cfg, arch: str = "relu", width: int = 40, *, seed: int = 0, bias: float = 0.05,
               act_scale: float | None = None, dec_scale: float = 1.0, k: int = 6, threshold: float = 0.02,
               site: str = "ln2.normalized") -> CrossLayerTranscoder:
    """A random CLT for a model config with encoder bias `bias` (positive: many features fire), decoders scaled
    by `dec_scale` and a uniform input scale `act_scale`: for tests, benchmarks and trying the pipeline."""
    clt = init(arch, cfg.n_layers, cfg.d_model, width, jax.random.key(seed), site=site, k=k, threshold=threshold,
               decoder_norm=dec_scale)
    clt = eqx.tree_at(lambda c: c.b_enc, clt, jnp.full_like(clt.b_enc, bias))
    if act_scale is not None:
        clt = eqx.tree_at(lambda c: c.act_scale, clt, jnp.full_like(clt.act_scale, act_scale))
    return clt


# ----------------------------------------------------------------------------- from arrays

ARRAY_SHAPES = {"W_enc": ("L", "D", "W"), "b_enc": ("L", "W"), "W_dec": ("L", "W", "L", "D"), "b_dec": ("L", "D"),
           "act_scale": ("L", 1), "threshold": ("L", "W")}


def from_arrays(where, info: dict, arrays: dict) -> CrossLayerTranscoder:
    """A CLT from our array names, every shape and value checked (InputError naming `where`)."""
    arch = info.get("arch")
    if arch not in ARCHS:
        raise InputError(f"{where}: arch {arch!r} is not one of {', '.join(ARCHS)}")
    need = {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"threshold"} if arch == "jumprelu" else set())
    if missing := sorted(need - set(arrays)):
        raise InputError(f"{where}: a {arch} cross-layer transcoder needs arrays {missing} (has {sorted(arrays)})")
    enc = np.shape(arrays["W_enc"])
    if len(enc) != 3:
        raise InputError(f"{where}: W_enc must be [n_layers, d_in, width], got shape {enc}")
    dims = dict(zip("LDW", enc), **{"1": 1})
    arrays = {"act_scale": np.ones((enc[0], 1), np.float32), **arrays}
    for name, a in arrays.items():
        want = tuple(dims[str(x)] for x in ARRAY_SHAPES.get(name, ()))
        if name in ARRAY_SHAPES and np.shape(a) != want:
            raise InputError(f"{where}: {name} has shape {np.shape(a)}, expected {want} for W_enc {enc}")
        if not np.all(np.isfinite(np.asarray(a, np.float32))):
            raise InputError(f"{where}: {name} holds non-finite values (NaN or Inf)")
    for key, have in (("n_layers", enc[0]), ("d_in", enc[1]), ("width", enc[2])):
        if info.get(key) is not None and info[key] != have:
            raise InputError(f"{where}: the metadata says {key}={info[key]} but the arrays have {key}={have}")
    site, target = info.get("site", "ln2.normalized"), info.get("target", "mlp_out")
    for name in (site, target):
        if name not in SITES or not SITES[name].per_layer:
            raise InputError(f"{where}: site {name!r} is not a layer site of models.sites")
    k = info.get("k", 32)
    if arch == "topk" and not (isinstance(k, int) and 1 <= k <= enc[2]):
        raise InputError(f"{where}: k={k!r} must be an integer in [1, width={enc[2]}]")
    a = {n: jnp.asarray(v, jnp.float32) for n, v in arrays.items()}
    clt = CrossLayerTranscoder(W_enc=a["W_enc"], b_enc=a["b_enc"], W_dec=a["W_dec"], b_dec=a["b_dec"],
                               act_scale=a["act_scale"], threshold=a.get("threshold"), arch=arch, site=site,
                               target=target, k=int(k), bandwidth=float(info.get("bandwidth", 0.05)))
    return eqx.tree_at(lambda c: c.W_dec, clt, clt.causal_W_dec())


