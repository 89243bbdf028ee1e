"""`experiments.refusal_judge` is `experiments.lib.refusal_judge` (the helpers that are not studies live in `experiments.lib`);
this alias keeps the old import path: `import experiments.refusal_judge` gives the same module object."""

import sys

from experiments.lib import refusal_judge

sys.modules[__name__] = refusal_judge
