"""`experiments.toxigen` is `experiments.lib.toxigen` (the helpers that are not studies live in `experiments.lib`);
this alias keeps the old import path: `import experiments.toxigen` gives the same module object."""

import sys

from experiments.lib import toxigen

sys.modules[__name__] = toxigen
