"""`experiments.gg_controller` is `experiments.lib.gg_controller` (the helpers that are not studies live in `experiments.lib`);
this alias keeps the old import path: `import experiments.gg_controller` gives the same module object."""

import sys

from experiments.lib import gg_controller

sys.modules[__name__] = gg_controller
