"""The configuration of an SAE training run (`TrainConfig`, whose fields are `python -m saes.train`'s flags),
checked field by field when it is built and against the model once that is known (`validate`)."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
import warnings
from dataclasses import dataclass

from models.errors import InputError, check_dtype
from models.sites import SITES, Hook, names_layer
from saes.core import cross_layer, sae as sae_lib
from saes.train.data import parse_hook, parse_hooks, site_width

__all__ = ["DEFAULT_SPARSITY", "ScheduleWarning", "TrainConfig", "transcoder_hooks", "validate"]


class ScheduleWarning(UserWarning):
    """The learning-rate warm-up and decay do not fit the run's steps."""

DEFAULT_SPARSITY = {"relu": 5.0, "gated": 2.0, "jumprelu": 1.0, "topk": 0.0, "batchtopk": 0.0}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run (the CLI's flags are these fields)."""

    # what to train
    model: str = "smollm2-135m-instruct"  # registered name (models.REGISTRY), .gguf file or Hugging Face directory
    site: tuple[str, ...] = ("resid_post",)  # sites (models.SITES) or hook names (L3.mlp_out, blocks.3.hook_mlp_out)
    layers: tuple[int, ...] = (10,)  # layers of the layer sites
    arch: str = "topk"  # relu, topk, batchtopk, jumprelu or gated
    target: str | None = None  # transcoders: each dictionary predicts this site at its layer (e.g. mlp_out)
    skip: bool = False  # transcoders: a learned linear skip path W_skip [d_in, d_in] (skip transcoders)
    cross_layer: bool = False  # one cross-layer transcoder over every layer (--target; arch relu, jumprelu or topk)
    width: int = 8192  # dictionary size (latents per SAE)
    k: int = 32  # active latents per token (topk, batchtopk)
    sparsity_coeff: float | None = None  # L1 (relu, gated) or L0 (jumprelu); None = the arch's default
    # data
    corpus: str | None = None  # a text/jsonl/parquet file or directory, or a saved HF dataset; None = default corpus
    text_field: str = "text"  # the text column of .jsonl / .parquet / dataset corpora
    context: int = 128  # tokens per packed row (BOS + context-1 text tokens)
    model_batch: int = 16  # rows per model forward
    chunk_tokens: int = 65536  # activations per shuffled on-device buffer
    cache: str | None = None  # train from this activation cache (written by `python -m saes.train.cache`)
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
    eval_rows: int = 8  # held-out rows for the CE / KL evaluation (0: none)
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
        _hooks_from_names(self)
        if self.arch not in sae_lib.ARCHS:
            raise InputError(f"unknown --arch {self.arch!r}; known: {', '.join(sae_lib.ARCHS)}")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise InputError(f"--b-dec-init must be geometric_median, mean or zeros, got {self.b_dec_init!r}")
        if self.cache is None:  # (a cache fixes its own hooks)
            _check_hooks(self.site, self.layers)
        if self.target is not None:
            _check_target(self.site, self.target)
        elif self.skip:
            raise InputError("--skip needs --target: a skip connection belongs to a transcoder (input -> target)")
        if self.cross_layer:
            _check_cross_layer(self)
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
        if self.dtype is not None:
            check_dtype(self.dtype)
        _warn_schedule(self)

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
    ("eval_rows", _finite(0), ">= 0"), ("checkpoint_every", _finite(1), ">= 1"), ("keep_checkpoints", _finite(1), ">= 1"),
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


def _hooks_from_names(cfg: TrainConfig):
    """Sites given as run keys (`L3.resid_post`) or TransformerLens names (`blocks.3.hook_resid_post`) become
    registry sites, their layers `cfg.layers`. One SAE is trained per site x layer, so the named hooks must be
    that whole grid; `--layers` other than its default that disagrees with the named layers is an InputError."""
    named = [s for s in cfg.site if s not in SITES and names_layer(s)]
    if not named:
        return
    hooks = [Hook.parse(s) if s in named else Hook(s) if s in SITES else s for s in cfg.site]
    sites = tuple(dict.fromkeys(h.site if isinstance(h, Hook) else h for h in hooks))
    layered = {(h.site, h.layer) for h in hooks if isinstance(h, Hook) and h.layer is not None}
    layers = tuple(sorted({layer for _, layer in layered}))
    default = TrainConfig.__dataclass_fields__["layers"].default
    if cfg.layers not in (default, layers):
        raise InputError(f"--site {list(named)} name layers {list(layers)} but --layers is {list(cfg.layers)}: "
                         "name the layers once (site names with --layers, or hook names alone)")
    grid = {(h.site, layer) for h in hooks if isinstance(h, Hook) and h.layer is not None for layer in layers}
    if layered != grid:
        raise InputError(f"--site {list(cfg.site)}: one SAE is trained per site x layer, so hook names must "
                         f"cover the grid {sorted(grid)}; missing {sorted(grid - layered)} (train separate runs "
                         "for hooks at different layers)")
    object.__setattr__(cfg, "site", sites)
    object.__setattr__(cfg, "layers", layers)


def _warn_schedule(cfg: TrainConfig):
    """A ScheduleWarning when the warm-up and the decay do not fit the steps (`saes.train.optim.lr_schedule` then caps
    the warm-up at the run: a short run trains below --lr throughout)."""
    steps, warm = cfg.steps, cfg.lr_warmup_steps
    decay = int(cfg.lr_decay_frac * steps)
    if warm + decay <= steps or warm == 0:
        return
    if warm >= steps:
        what = (f"the whole run is warm-up: the learning rate starts at --lr/{steps} and reaches --lr ({cfg.lr:g}) "
                "only at the last step, and never decays")
    else:
        what = f"the decay starts right after the warm-up and stops {warm + decay - steps} step(s) short of 0"
    warnings.warn(f"--lr-warmup-steps {warm} plus the decay over the last {decay} steps (--lr-decay-frac "
                  f"{cfg.lr_decay_frac:g}) exceed the run's {steps} steps (--tokens {cfg.tokens} // --batch-size "
                  f"{cfg.batch_size}): {what}. Use --lr-warmup-steps <= {steps - decay} (e.g. {max(1, steps // 10)})",
                  ScheduleWarning, stacklevel=4)


def _check_hooks(sites, layers):
    if any(layer < 0 for layer in layers):
        raise InputError(f"--layers must be >= 0, got {layers}")
    try:
        parse_hooks(sites, layers)
    except KeyError as e:
        raise InputError(f"--site: {e.args[0]}") from None
    unfit = [s for s in sites if "kv_seq" in SITES[s].axes]
    if unfit:
        raise InputError(f"--site {unfit}: attention scores/patterns have no fixed width for an SAE")


def _check_target(sites, target):
    if target not in SITES or not SITES[target].per_layer:
        raise InputError(f"--target {target!r} must be a layer site of models.sites (a transcoder predicts the "
                         "target at its input's layer), e.g. mlp_out")
    order = list(SITES)
    bad = [s for s in sites if s not in SITES or not SITES[s].per_layer or order.index(s) >= order.index(target)]
    if bad:
        raise InputError(f"--site {bad}: a transcoder's input must be a layer site computed before --target "
                         f"{target!r} in the layer (e.g. ln2.normalized or resid_mid for mlp_out)")


def _check_cross_layer(cfg: TrainConfig):
    if cfg.target is None:
        raise InputError("--cross-layer needs --target (a cross-layer transcoder predicts every layer's target, e.g. mlp_out)")
    if len(cfg.site) != 1:
        raise InputError(f"--cross-layer reads one site at every layer, got --site {cfg.site}")
    if cfg.arch not in cross_layer.ARCHS:
        raise InputError(f"--cross-layer supports --arch {', '.join(cross_layer.ARCHS)}, got {cfg.arch!r}")
    if cfg.skip:
        raise InputError("--cross-layer with --skip: cross-layer transcoders here have no skip path")


def transcoder_hooks(cfg: TrainConfig, hooks) -> dict[str, str]:
    """`{input hook: target hook}` of a transcoder run over stream names `hooks` (a source's, or the config's
    inputs): each input's target at its layer; the targets themselves are no inputs. Empty for SAEs."""
    if cfg.target is None:
        return {}
    parsed = {h: tuple(parse_hook(h)) for h in hooks}
    return {h: Hook(cfg.target, layer).key for h, (site, layer) in parsed.items() if site != cfg.target}


def _is(value, t) -> bool:
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


@functools.cache
def _hints() -> dict:
    return typing.get_type_hints(TrainConfig)


def check_devices(cfg: TrainConfig, n_devices: int) -> None:
    """`--feature-parallel` (times `--data-parallel`, 0: the devices left) fits the `n_devices` there are, as
    `saes.train.state.make_mesh` will use them; `saes.train.loop.train` calls this before the model loads."""
    fp = max(cfg.feature_parallel, 1)
    dp = cfg.data_parallel or n_devices // fp
    if fp > n_devices or dp * fp > n_devices:
        raise InputError(f"--feature-parallel {fp} x --data-parallel {dp or 1} needs {fp * max(dp, 1)} devices, "
                         f"this host has {n_devices} (jax.device_count()); lower --feature-parallel to at most "
                         f"{n_devices}")


def validate(cfg: TrainConfig, model_cfg) -> None:
    """Checks that need the model's config (`models.Config`): layers inside the model, context within its
    context. Called as soon as the model's config is known, before any data is read."""
    if cfg.context > model_cfg.n_ctx:
        raise InputError(f"--context ({cfg.context}) is longer than the model's context of {model_cfg.n_ctx}")
    bad = [layer for layer in cfg.layers if not 0 <= layer < model_cfg.n_layers]
    if bad and not cfg.cache:
        raise InputError(f"--layers {bad} out of range for a {model_cfg.n_layers}-layer model (valid: 0 to "
                         f"{model_cfg.n_layers - 1})")
    if cfg.cross_layer and not cfg.cache and tuple(sorted(cfg.layers)) != tuple(range(model_cfg.n_layers)):
        raise InputError(f"--cross-layer needs --layers to be every layer of the model (0 to {model_cfg.n_layers - 1}), "
                         f"got {cfg.layers}")
    if cfg.target is not None:
        widths = {s: site_width(model_cfg, s) for s in (*cfg.site, cfg.target)}
        if len(set(widths.values())) > 1:
            raise InputError(f"--site/--target widths differ ({widths}): a transcoder here maps a site to one of the "
                             "same width (e.g. ln2.normalized or resid_mid -> mlp_out)")
