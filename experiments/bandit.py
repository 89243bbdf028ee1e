"""`experiments.bandit` is `experiments.lib.bandit` (the helpers that are not studies live in `experiments.lib`);
this alias keeps the old import path: `import experiments.bandit` gives the same module object."""

import sys

from experiments.lib import bandit

sys.modules[__name__] = bandit
