"""Training, over `saes.core` and `saes.io`: `loop` (`fit`, the CLI: `python -m saes.train`), `config`
(`TrainConfig`), `optim`, `state` (the train state and its sharding), `step` (the jitted step), `data`
(corpora, token rows, activation sources), `cache` (activation caches on disk: `python -m saes.train.cache`),
`report` (the run's plots) and `synthetic` (planted dictionaries). `data` and `synthetic` load with
`import saes`; the rest on first use (`saes.train.loop`, `saes.fit`)."""

import importlib


MODULES = ("loop", "config", "optim", "state", "step", "data", "cache", "report", "synthetic")


def __getattr__(name):
    if name in MODULES:  # loaded on first use
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
