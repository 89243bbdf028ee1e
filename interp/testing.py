"""`interp.testing` is `models.testing` (tiny configs and random models live with the models); this alias keeps
the old import path: `import interp.testing` gives the same module object."""

import sys

from models import testing

sys.modules[__name__] = testing
