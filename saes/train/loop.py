"""Train SAE dictionaries: one jitted step for all hooks, mesh sharding, metrics, exact resume, a report.

    python -m saes.train --model smollm2-135m-instruct --site resid_post --layers 10,15 --arch topk --k 32 \\
        --width 8192 --tokens 2_000_000

or from Python:

    cfg = saes.TrainConfig(site=("resid_post",), layers=(10, 15), arch="topk", k=32, width=8192, tokens=2_000_000)
    result = saes.fit(cfg)               # result.saes: {"L10.resid_post": SAE, ...}

Every hook gets its own SAE; all of them are trained by ONE jitted step on the same token batch. The parts:
`saes.train.config` (`TrainConfig`, every flag validated when built, `validate` against the model),
`saes.train.optim` (Adam, schedules), `saes.train.state` (`TrainState`, initialisation and calibration, mesh and
sharding by the SAEs' declared axes), `saes.train.step` (the jitted step, batch feeding),
`models.checkpoints` (verified orbax checkpoints); this module builds the activation source, runs the loop
and is the CLI.

Outputs under `out/`: `config.json`, `metrics.jsonl` (one line per `log_every` steps and per evaluation),
`checkpoints/` (orbax: SAE params, optimizer state, feature statistics, step; with the data-stream
position and seed as JSON), `saes/<hook>/` (our format), `report.json` and `training_curves.png`. A run
restarted with the same `out` resumes from its newest valid checkpoint and ends with bit-identical weights:
each checkpoint stores a SHA-256 of its contents, verified on restore; one that does not restore or verify is
reported, moved to `checkpoints.damaged/` and the previous one is used. Rerunning a finished run is a no-op.
A non-finite loss or parameter stops training with `TrainingDiverged`, naming the step; checkpoints are
only written from finite states, so the last one is good.

The command line recycles host memory on CPU (`models.host_memory.recycle_freed_memory`: a training process
calls the same programs on same-shaped batches, and reusing their freed buffers took `bench.sae`'s step from
725 to 592 ms); from Python, call it yourself before the first JAX computation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

import models
from models import cli
from models.errors import InputError
from models.sites import SITES, Hook
from saes.io import formats
from saes.train import data, report
from models.checkpoints import CheckpointCorrupt, Checkpointer
from saes.core.cross_layer import CrossLayerTranscoder
from saes.train.data import hook_dir, parse_hook
from saes.core.evaluate import ce_metrics
from saes.core.sae import SAE
from saes.train.config import TrainConfig, check_devices, transcoder_hooks, validate
from saes.train.state import TrainState, abstract_state, calibrate, fresh_state, make_mesh, place_state
from saes.train.step import make_permute, make_slice, make_step

__all__ = ["CheckpointCorrupt", "Checkpointer", "TrainConfig", "TrainResult", "TrainState", "TrainingDiverged",
           "build_source", "calibrate", "cli_parser", "fresh_state", "main", "make_step", "train", "validate"]


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss or parameter."""


@dataclass
class TrainResult:
    """What `saes.fit` returns: the trained dictionaries by hook key, the final metrics, the run directory,
    the final state and the metrics history."""
    saes: dict[str, SAE]
    metrics: dict[str, Any]
    out: Path
    state: TrainState | None = None
    history: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------- sources from a config


def build_source(cfg: TrainConfig, model=None, docs: Callable[..., Iterable[str]] | None = None):
    """(model or None, source, eval tokens or None) for a config: an activation cache if `cfg.cache`, else
    the model on the corpus (`docs`, a document function as `TokenRows` takes, replaces `cfg.corpus`)."""
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
    hooks += [data.parse_hook(t) for t in transcoder_hooks(cfg, [h.key for h in hooks]).values()]  # targets stream too
    rows = _token_rows(cfg, model, "train", docs)
    source = data.ModelSource(model, hooks, rows, chunk_tokens=cfg.chunk_tokens, model_batch=cfg.model_batch)
    source.meta.update(corpus=cfg.corpus or ("the caller's docs" if docs is not None else
                                             "default (Python + package docstrings)"))
    return model, source, _eval_rows(cfg, model, docs)


def _eval_rows(cfg, model, docs=None):
    """Held-out rows for CE evaluation (every 50th document); a corpus too small for that uses its first rows.
    None when `cfg.eval_rows` is 0 (no CE evaluation)."""
    if cfg.eval_rows == 0:
        return None
    try:
        return _token_rows(cfg, model, "eval", docs).take(cfg.eval_rows)
    except InputError:
        print("corpus too small for a held-out split: evaluating on its first rows", file=sys.stderr)
        return _token_rows(cfg, model, "all", docs).take(cfg.eval_rows)


def _load_model(name, dtype):
    return models.load(name, dtype=dtype)


def _token_rows(cfg, model, split, docs=None):
    if docs is None and cfg.corpus:
        docs = lambda: data.iter_documents(cfg.corpus, cfg.text_field)  # noqa: E731
    elif docs is None:
        docs = data.default_corpus
    return data.TokenRows(docs, model.tokenizer, cfg.context, split=split, seed=cfg.seed)


def _hook_info(source, cfg: TrainConfig) -> dict[str, tuple[str, int | None, int]]:
    """{hook: (site, layer, d_in)} of the dictionaries to train, from a source's hook names (`saes.train.data.parse_hook`:
    validated identities); a transcoder run's target streams get none. Each target must be in the source."""
    targets = transcoder_hooks(cfg, source.hooks)
    missing = sorted(set(targets.values()) - set(source.hooks))
    if missing:
        raise InputError(f"--target {cfg.target}: the activation source lacks {missing} (has {list(source.hooks)})")
    return {h: (*parse_hook(h), int(source.d_in[h])) for h in source.hooks if h not in set(targets.values())}


# ----------------------------------------------------------------------------- the loop


def _to_host(tree):
    return jax.tree.map(lambda x: float(np.asarray(x)), jax.device_get(tree))


def train(cfg: TrainConfig, *, source=None, model=None, eval_tokens=None, stop_after: int | None = None,
          docs: Callable[..., Iterable[str]] | None = None) -> TrainResult:
    """Train (or resume) the run `cfg` describes; see the module docstring. `source`/`model`/`eval_tokens`
    override what the config would build (tests, notebooks). `docs` is the document function for the token
    rows instead of `cfg.corpus` (called with a seed per epoch if it takes one, as `TokenRows` does; e.g.
    `lambda seed=0: saes.train.data.mix_corpora(corpora, weights, seed)`); it is not part of the saved config, so
    resume a run with the same `docs`. `stop_after` ends the loop early after that many steps in this call
    (the run can be resumed)."""
    from tqdm.auto import tqdm

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    finished = _finished(cfg, out)
    if finished is not None:
        print(f"{out} is already finished ({cfg.steps} steps, report.json written): nothing to do (another --out or "
              "--resume false trains again)", file=sys.stderr)
        history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        return TrainResult(formats.load_run(out), finished, out, None, history)
    check_devices(cfg, jax.device_count())  # before the model loads
    if source is None:
        model, source, built_eval = build_source(cfg, model, docs)
        eval_tokens = built_eval if eval_tokens is None else eval_tokens
    (out / "config.json").write_text(json.dumps(cfg.to_json(), indent=1))
    print(summary_line(cfg), file=sys.stderr)

    mesh = make_mesh(cfg)
    hooks = _hook_info(source, cfg)
    key = jax.random.key(cfg.seed)
    step_fn = make_step(cfg, mesh)
    permute, slice_ = make_permute(), make_slice(cfg.batch_size, mesh)
    if not cfg.resume:  # a fresh run in this directory: earlier checkpoints would collide with this run's
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    ckpt = Checkpointer(out / "checkpoints", cfg.keep_checkpoints)
    metrics_path = out / "metrics.jsonl"

    template = jax.eval_shape(lambda: fresh_state(cfg, hooks, key))
    had_checkpoints = bool(ckpt.mgr.all_steps())
    restored = ckpt.restore_valid(abstract_state(template, mesh)) if cfg.resume else None
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
        state = place_state(state, mesh)

    total = cfg.steps
    step = int(state.step)
    n_batches = next(iter(chunk.values())).shape[0] // cfg.batch_size
    if n_batches == 0:
        raise InputError(f"chunks of {next(iter(chunk.values())).shape[0]} activations hold no batch of {cfg.batch_size}")
    bar = tqdm(total=total, initial=step, unit="step", disable=not cfg.progress, dynamic_ncols=True)
    acc, acc_n, t_last, tok_last = None, 0, time.perf_counter(), step * cfg.batch_size
    speed = Smoothed()
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
                    bar.set_postfix(_postfix(rec, speed.update(rec["tokens_per_s"])), refresh=False)
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
    model_name = getattr(model, "name", None) or (getattr(source, "meta", None) or {}).get("model")
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
    clts = {h: s for h, s in saes.items() if isinstance(s, CrossLayerTranscoder)}
    return {**ce_metrics(model, {h: s for h, s in saes.items() if h not in clts}, tokens),
            **{h: s.ce_metrics(model, tokens) for h, s in clts.items()}}


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


class Smoothed:
    """An exponential moving average of a rate (tokens/s) over log windows; the first window (which holds the
    compilation) only stands until the second arrives, so the shown speed is not dragged down by it."""

    def __init__(self, weight: float = 0.3):
        self.weight, self.value, self.n = weight, None, 0

    def update(self, x: float) -> float:
        self.n += 1
        self.value = x if self.n <= 2 else (1 - self.weight) * self.value + self.weight * x
        return self.value


def summary_line(cfg: TrainConfig) -> str:
    """One line saying what a run trains (the full config is `out/config.json`)."""
    hooks = ([Hook(s, layer).key for s in cfg.site for layer in (cfg.layers if SITES[s].per_layer else (None,))]
             if cfg.cache is None else ["hooks of " + cfg.cache])
    kind = "cross-layer transcoder" if cfg.cross_layer else "transcoders" if cfg.target else "SAEs"
    sparsity = f"k {cfg.k}" if cfg.arch in ("topk", "batchtopk") else f"sparsity {cfg.coeff:g}"
    data = f"cache {cfg.cache}" if cfg.cache else f"{cfg.model} on {cfg.corpus or 'the default corpus'}"
    return (f"training {cfg.arch} {kind} ({', '.join(hooks)}{' -> ' + cfg.target if cfg.target else ''}), width "
            f"{cfg.width}, {sparsity}; {data}; {cfg.steps} steps x {cfg.batch_size} tokens, lr {cfg.lr:g} (warm-up "
            f"{cfg.lr_warmup_steps} steps, decay over the last {cfg.lr_decay_frac:.0%}); full config: "
            f"{Path(cfg.out) / 'config.json'}")


def _postfix(rec: dict, tokens_per_s: float | None = None) -> dict:
    hooks = [k for k, v in rec.items() if isinstance(v, dict)]
    if not hooks:
        return {}
    h = rec[hooks[0]]
    speed = rec["tokens_per_s"] if tokens_per_s is None else tokens_per_s
    return {"EV": f"{h['explained_variance']:.3f}", "L0": f"{h['l0']:.1f}", "dead": f"{h['dead_frac']:.2f}",
            "tok/s": f"{speed:.0f}"}


# ----------------------------------------------------------------------------- CLI


def cli_parser() -> argparse.ArgumentParser:
    """The CLI of `TrainConfig` (`models.cli`): each flag with its description and default."""
    return cli.parser(TrainConfig, prog="python -m saes.train", description=__doc__.split("\n\n")[0])


def main(argv=None) -> TrainResult:
    """`python -m saes.train`: parse a `TrainConfig` from flags, train (resuming if the run exists), print the metrics."""
    cfg = cli.parse(TrainConfig, argv, prog="python -m saes.train", description=__doc__.split("\n\n")[0])
    result = train(cfg)
    print(json.dumps(result.metrics, indent=1))
    return result

