"""Circuit tracing over `saes.core` and `saes.io`: `attribution` (attribution graphs through the local
replacement model) and `feature_effects` (interventions on features, the graphs' check). Its modules load on
first use (`saes.circuits.attribution`), so `import saes` stays light."""

import importlib


def __getattr__(name):
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
