"""Circuit tracing over `saes.core` and `saes.io`: `attribution` (attribution graphs through the local
replacement model) and `feature_effects` (interventions on features, the graphs' check). Its modules load on
first use (`saes.circuits.attribution`), so `import saes` stays light."""

import importlib


MODULES = ("attribution", "feature_effects")


def __getattr__(name):
    if name in MODULES:  # loaded on first use
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
