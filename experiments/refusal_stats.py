"""`experiments.refusal_stats` is `experiments.lib.refusal_stats` (the helpers that are not studies live in `experiments.lib`);
this alias keeps the old import path: `import experiments.refusal_stats` gives the same module object."""

import sys

from experiments.lib import refusal_stats

sys.modules[__name__] = refusal_stats
