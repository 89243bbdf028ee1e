"""circuit-tracer peer: Anthropic-style attribution graphs computed by the PyTorch reference implementation
(safety-research/circuit-tracer 0.5.0, its nnsight backend), run in its own venv (torch + circuit-tracer + gguf;
.venv-circuit-tracer), so that our JAX attribution can be compared with it. A subprocess entry point, not a test:

    .venv-circuit-tracer/bin/python tests/peers/_circuit_tracer_peer.py --model MODEL --transcoders DIR \
        --tokens '[1, 2, 3]' --out OUT.npz [--max-n-logits 10] [--desired-logit-prob 0.95] [--batch-size 256] \
        [--max-feature-nodes N] [--check]
    .venv-circuit-tracer/bin/python tests/peers/_circuit_tracer_peer.py --make-tiny DIR   # tiny random Llama + transcoders

MODEL is a .gguf file (transformers dequantizes it to float32) or a Hugging Face directory (config.json +
model.safetensors as save_pretrained writes them; a tokenizer there is optional: without one a word-level
tokenizer with one token per id is made up, its special tokens the config's bos/eos ids). DIR holds
circuit-tracer's CLT files (W_enc_{i}.safetensors, W_dec_{i}.safetensors and a config.yaml with model_kind:
cross_layer_transcoder and the two hooks, read by its load_clt) or its own per-layer transcoder format, layer_{i}.safetensors (W_enc [d_tc, d_model], W_dec [d_tc,
d_model], b_enc [d_tc], b_dec [d_model], optional activation_function.threshold [d_tc] for JumpReLU and
W_skip [d_model, d_model]) and config.yaml, read by circuit-tracer's own loader (load_transcoders):

    model_kind: transcoder_set
    feature_input_hook: mlp.hook_in      # input of model.layers[L].mlp (after the second RMSNorm and its weight)
    feature_output_hook: mlp.hook_out    # output of model.layers[L].mlp
    scan: any-label
    transcoders: [layer_0.safetensors, layer_1.safetensors, ...]   # relative paths: relative to DIR (made so here)

Everything is float32 on the CPU and offline (no hub access). TOKENS must start with a special token (BOS):
otherwise circuit-tracer prepends one, which `input_tokens` then shows.

OUT.npz holds the unpruned graph of circuit_tracer.attribute: adjacency_matrix [n, n] (row = target, column =
source; nodes ordered: selected features, n_layers * n_pos error nodes (layer-major), n_pos token nodes,
logit nodes), active_features [n_active, 3] (layer, pos, feature), activation_values [n_active],
selected_features (indices into active_features, ascending), logit_targets (token ids), logit_probabilities,
input_tokens, last_logits (the plain model's logits at the last position), setup_s (model and transcoder
load), wall_s (attribute() alone), peak_rss_mib (ru_maxrss) and the package versions as strings. With
--check it also runs an exactness check through circuit-tracer's own AttributionContext: with the error nodes
restored at position 0 and b_dec folded into them, each logit row must sum to the demeaned logit and each
feature row to its pre-activation minus b_enc; the largest deviations are written as check_logit_err and
check_feature_err (and printed).
"""

import argparse
import json
import os
import resource
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402


def word_tokenizer(n_vocab: int, special: list[int]):
    """A tokenizer with one word per id (`<i>`), for model directories without one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(n_vocab)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    names = {}
    if len(special) > 0 and special[0] is not None:
        names["bos_token"] = f"<{special[0]}>"
    if len(special) > 1 and special[1] is not None:
        names["eos_token"] = f"<{special[1]}>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<0>", **names)


def load_hf(model: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    if path.suffix == ".gguf":
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kw)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, **kw)
        if any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            tok = AutoTokenizer.from_pretrained(path)
        else:
            cfg = hf.config
            tok = word_tokenizer(cfg.vocab_size, [cfg.bos_token_id, cfg.eos_token_id])
    return hf.eval(), tok


def load_transcoder_set(directory: str):
    """circuit-tracer's transcoders from DIR: a per-layer set (`load_transcoders`) or, with `model_kind:
    cross_layer_transcoder` in config.yaml, a CLT (`load_clt`, which reads W_enc_{i}/W_dec_{i} files)."""
    from circuit_tracer.utils.hf_utils import load_transcoders

    directory = Path(directory)
    config = yaml.safe_load((directory / "config.yaml").read_text())
    if config.get("model_kind") == "cross_layer_transcoder":
        from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

        return load_clt(str(directory), feature_input_hook=config["feature_input_hook"],
                        feature_output_hook=config["feature_output_hook"], scan=config.get("scan", directory.name),
                        device=torch.device("cpu"), dtype=torch.float32, lazy_decoder=False, lazy_encoder=False)
    # circuit-tracer opens local paths as given (relative to the cwd): anchor relative ones at DIR.
    config["transcoders"] = [p if p.startswith("hf://") or os.path.isabs(p) else str(directory / p)
                             for p in config["transcoders"]]
    config.setdefault("scan", directory.name)
    return load_transcoders(config, device=torch.device("cpu"), dtype=torch.float32, lazy_encoder=False,
                            lazy_decoder=False)


def replacement_model(hf, tok, transcoders):
    """NNSightReplacementModel around an already loaded HF model: what its from_config does after building the
    model (from_pretrained_and_transcoders would reload by name and cannot pass gguf_file)."""
    from circuit_tracer.replacement_model.replacement_model_nnsight import NNSightReplacementModel

    if not hf.config.architectures:  # a config made from GGUF metadata has none; circuit-tracer maps by it
        hf.config.architectures = [type(hf).__name__]
    model = NNSightReplacementModel(hf, tokenizer=tok, dispatch=True)
    model._hf_config = hf.config
    model._configure_replacement_model(transcoders)
    return model


def mlp_outputs(hf, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain HF model's logits [T, V] and its MLP outputs [L, T, d_model]."""
    outs = []
    hooks = [layer.mlp.register_forward_hook(lambda m, i, o: outs.append(o.detach()[0]))
             for layer in hf.model.layers]
    try:
        with torch.no_grad():
            logits = hf(tokens[None]).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return logits, torch.stack(outs)


def exactness_check(model, hf, transcoders, tokens, logit_ids: torch.Tensor) -> tuple[float, float]:
    """Re-run circuit-tracer's attribution context with every MLP output accounted for (error nodes at position 0
    restored, b_dec moved into the error vectors): the linearised model is then exact, so a logit row sums to
    logit[t] - mean(logit) and a feature row to its pre-activation minus b_enc."""
    from circuit_tracer.attribution.targets import AttributionTargets

    ctx = model.setup_attribution(tokens)
    logits, mlp_out = mlp_outputs(hf, tokens)
    b_dec = torch.stack([t.b_dec for t in transcoders])  # [L, d_model]
    err = ctx.error_vectors + b_dec[:, None]
    err[:, model.zero_positions] = mlp_out[:, model.zero_positions]  # no features there: the whole MLP output
    ctx.error_vectors = err
    n_layers, n_pos, _ = ctx.activation_matrix.shape
    k = min(64, ctx.activation_matrix._nnz())
    model.run_forward_pass(tokens, max(k, len(logit_ids)), ctx)  # one backward row per batch entry
    targets = AttributionTargets(attribution_targets=logit_ids, logits=ctx.logits[0, -1],
                                 unembed_proj=model.unembed_proj, tokenizer=model.tokenizer)
    rows = ctx.compute_batch(layers=torch.full((len(logit_ids),), n_layers),
                             positions=torch.full((len(logit_ids),), n_pos - 1),
                             inject_values=targets.logit_vectors)
    last = logits[-1]
    want = last[logit_ids] - last.mean()
    logit_err = float((rows.sum(1) - want).abs().max() / want.abs().max().clamp_min(1e-12))
    layers, pos, feats = ctx.activation_matrix.indices()
    rows = ctx.compute_batch(layers=layers[:k], positions=pos[:k], inject_values=ctx.encoder_vecs[:k],
                             retain_graph=False)
    b_enc = torch.stack([t.b_enc for t in transcoders])
    want = ctx.activation_matrix.values()[:k] - b_enc[layers[:k], feats[:k]]
    feature_err = float((rows.sum(1) - want).abs().max() / want.abs().max().clamp_min(1e-12)) if k else 0.0
    return logit_err, feature_err


def attribute_graph(args) -> None:
    from circuit_tracer import attribute

    torch.set_num_threads(int(os.environ.get("CT_THREADS", torch.get_num_threads())))
    t0 = time.perf_counter()
    hf, tok = load_hf(args.model)
    transcoders = load_transcoder_set(args.transcoders)
    model = replacement_model(hf, tok, transcoders)
    setup_s = time.perf_counter() - t0

    tokens = torch.tensor(json.loads(args.tokens), dtype=torch.long)
    t0 = time.perf_counter()
    graph = attribute(tokens, model, max_n_logits=args.max_n_logits, desired_logit_prob=args.desired_logit_prob,
                      batch_size=args.batch_size, max_feature_nodes=args.max_feature_nodes)
    wall_s = time.perf_counter() - t0
    used = graph.input_tokens.cpu()
    logits, _ = mlp_outputs(hf, used)
    logit_ids = torch.tensor([t.vocab_idx if hasattr(t, "vocab_idx") else int(t) for t in graph.logit_targets])
    out = dict(
        adjacency_matrix=graph.adjacency_matrix.float().numpy(),
        active_features=graph.active_features.cpu().numpy(),
        activation_values=graph.activation_values.float().cpu().numpy(),
        selected_features=graph.selected_features.cpu().numpy(),
        logit_targets=logit_ids.numpy(),
        logit_probabilities=graph.logit_probabilities.float().cpu().numpy(),
        input_tokens=used.numpy(),
        last_logits=logits[-1].numpy(),
        setup_s=setup_s, wall_s=wall_s,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        versions=json.dumps({p: version(p) for p in ("torch", "circuit-tracer", "transformers", "nnsight")}),
    )
    if args.check:
        out["check_logit_err"], out["check_feature_err"] = exactness_check(model, hf, transcoders, used, logit_ids)
    np.savez(args.out, **out)
    n = out["adjacency_matrix"].shape[0]
    print(json.dumps(dict(nodes=n, active=len(out["active_features"]), selected=len(out["selected_features"]),
                          logits=len(logit_ids), setup_s=round(setup_s, 2), wall_s=round(wall_s, 2),
                          peak_rss_mib=round(out["peak_rss_mib"]),
                          **{k: out[k] for k in ("check_logit_err", "check_feature_err") if k in out})))


def write_transcoders(directory: Path, n_layers: int, d_model: int, width: int, seed: int = 0,
                      scale: float = 0.3, b_enc: float = -0.2, b_dec: float = 0.0) -> None:
    """Random ReLU transcoders in circuit-tracer's format (numpy; b_dec 0 so the --check sums are exact)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for layer in range(n_layers):
        f = lambda *s, k=scale: (k * rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)  # noqa: E731
        save_file({"W_enc": f(width, d_model), "W_dec": f(width, d_model),
                   "b_enc": np.full(width, b_enc, np.float32) + f(width, k=0.05 * np.sqrt(width)),
                   "b_dec": np.full(d_model, b_dec, np.float32)}, str(directory / f"layer_{layer}.safetensors"))
        names.append(f"layer_{layer}.safetensors")
    (directory / "config.yaml").write_text(yaml.safe_dump(dict(
        model_kind="transcoder_set", feature_input_hook="mlp.hook_in", feature_output_hook="mlp.hook_out",
        scan="random-relu", transcoders=names), sort_keys=False))


def make_tiny(directory: str, n_layers: int = 2) -> None:
    """DIR/model: a tiny random Llama (save_pretrained, seed 0); DIR/transcoders: random ReLU transcoders, width 48."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(Path(directory) / "model")
    write_transcoders(Path(directory) / "transcoders", n_layers, 32, 48, scale=3.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--make-tiny", metavar="DIR")
    p.add_argument("--n-layers", type=int, default=2, help="layers of the --make-tiny model")
    p.add_argument("--make-transcoders", metavar="DIR", help="random ReLU transcoders for --model's shape")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--model")
    p.add_argument("--transcoders")
    p.add_argument("--tokens")
    p.add_argument("--out")
    p.add_argument("--max-n-logits", type=int, default=10)
    p.add_argument("--desired-logit-prob", type=float, default=0.95)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-feature-nodes", type=int, default=None)
    p.add_argument("--check", action="store_true")
    args = p.parse_args()
    if args.make_tiny:
        return make_tiny(args.make_tiny, args.n_layers)
    if args.make_transcoders:
        from transformers import AutoConfig

        path = Path(args.model)
        cfg = (AutoConfig.from_pretrained(path.parent, gguf_file=path.name) if path.suffix == ".gguf"
               else AutoConfig.from_pretrained(path))
        return write_transcoders(Path(args.make_transcoders), cfg.num_hidden_layers, cfg.hidden_size, args.width)
    if not (args.model and args.transcoders and args.tokens and args.out):
        p.error("--model, --transcoders, --tokens and --out are required")
    attribute_graph(args)


if __name__ == "__main__":
    sys.exit(main())
