"""Moved to :mod:`jaxdiff.metrics.inception` (0.2): this alias keeps ``import jaxdiff.models.inception`` working."""

import sys
import warnings

from jaxdiff.metrics import inception as _inception

warnings.warn(
    "jaxdiff.models.inception moved to jaxdiff.metrics.inception; import it from there.", DeprecationWarning, 2
)
sys.modules[__name__] = _inception
