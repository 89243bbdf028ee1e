"""Cache model activations to disk for training later (`--cache DIR` in `python -m saes.train`).

    python -m saes.train.cache --model smollm2-135m-instruct --site resid_post --layers 10,15 --tokens 1_000_000 \\
        --out runs/cache/smollm2-L10-L15

Takes the same flags as `saes.train.loop` (those about the model, corpus and chunking matter here); `--out` is the
cache directory. Chunks are written exactly as the trainer would see them live, so training from the cache
with the same `--chunk-tokens` reproduces a live run batch for batch. Host memory is recycled, as in
`python -m saes.train`.
"""

from __future__ import annotations

import json

from models import cli, host_memory
from saes.train.data import cache_activations
from saes.train.loop import TrainConfig, build_source


def main(argv=None):
    """`python -m saes.train.cache`: write the activations a `TrainConfig` would train on to a disk cache (`--out`)."""
    cfg = cli.parse(TrainConfig, argv, prog="python -m saes.train.cache", description=__doc__.split("\n\n")[0],
                    docs={"out": "the cache directory to write", "cache": "(not used here: give the directory to "
                          "write as --out)"})
    if cfg.cache:
        raise SystemExit("--cache names a cache to read; give the directory to write as --out")
    _, source, _ = build_source(cfg)
    cache = cache_activations(source, cfg.out, cfg.tokens, progress=cfg.progress)
    print(json.dumps(dict(directory=str(cache.dir), hooks=cache.hooks, chunks=cache.n_chunks,
                          chunk_tokens=cache.chunk_tokens)))
    return cache


if __name__ == "__main__":
    host_memory.recycle_freed_memory()
    main()
