"""The main job: load a model, chat-format a prompt, generate, capture activations, summarise each layer
and save a figure.   `./run demo [--model NAME_OR_HF_DIR] [--prompt TEXT]`"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import models
from models.transformer import norm, unembed


def main(argv=None):
    """`./run demo`: load a model, chat, generate, capture every site and write a per-layer summary figure."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m-instruct", help=f"registered name ({', '.join(models.REGISTRY)}), .gguf file or HF directory")
    ap.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--out", default="runs/demo")
    args = ap.parse_args(argv)

    t0 = time.time()
    m = models.load(args.model)
    print(f"loaded {args.model}: {m.cfg.arch}, {m.cfg.n_layers} layers, d_model {m.cfg.d_model}, "
          f"{m.cfg.n_heads} heads ({m.cfg.n_kv_heads} kv), dtype {m.cfg.dtype}, {time.time() - t0:.1f}s")
    messages = [{"role": "user", "content": args.prompt}]
    text = m.apply_chat_template(messages) if m.tokenizer.chat_template else args.prompt
    t0 = time.time()
    [reply] = models.generate(m, [text], max_new_tokens=args.max_new_tokens)
    print(f"\nprompt: {args.prompt}\nreply ({time.time() - t0:.1f}s): {reply}\n")

    tokens, mask = m.tokenize([text + reply])
    logits, acts = models.forward(m, tokens, attention_mask=mask, capture=("resid_post", "attn.pattern"))
    resid, pattern = acts["resid_post"][:, 0], acts["attn.pattern"][:, 0]  # [L, T, D], [L, H, T, T]
    target = int(jnp.argmax(logits[0, -1]))
    lens = jax.nn.softmax(unembed(m.params, norm(resid, m.params["ln_final"], m.cfg), m.cfg), -1)  # [L, T, V]
    entropy = -(pattern * jnp.log(jnp.where(pattern > 0, pattern, 1.0))).sum(-1).mean((1, 2))  # [L]

    print(f"per-layer summary over {tokens.shape[1]} tokens (logit lens at the last position; final top token "
          f"{m.decode([target], skip_special=False)!r}):")
    print(f"{'layer':>5} {'|resid|':>9} {'attn entropy':>13} {'lens top token':>18} {'p(final top)':>13}")
    for layer in range(m.cfg.n_layers):
        top = int(jnp.argmax(lens[layer, -1]))
        print(f"{layer:>5} {float(jnp.linalg.norm(resid[layer], axis=-1).mean()):>9.2f} {float(entropy[layer]):>13.3f} "
              f"{m.decode([top], skip_special=False)!r:>18} {float(lens[layer, -1, target]):>13.4f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    im = a.imshow(np.asarray(lens[:, :, target]), aspect="auto", origin="lower", cmap="viridis")
    a.set(xlabel="position", ylabel="layer", title=f"logit lens: p({m.decode([target], skip_special=False)!r}) per layer and position")
    fig.colorbar(im, ax=a)
    b.plot(np.asarray(entropy), marker="o")
    b.set(xlabel="layer", ylabel="mean attention entropy (nats)", title="attention entropy per layer")
    fig.tight_layout()
    fig.savefig(out / "demo.png", dpi=120)
    print(f"\nsaved {out / 'demo.png'}")
    # the viewer lives above models (experiments.viewer): the command only, no import
    print(f"browse graphs, features and heads written under {out}: python -m experiments.viewer serve {out}")


if __name__ == "__main__":
    main()
