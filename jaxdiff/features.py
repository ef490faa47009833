"""Moved to :mod:`jaxdiff.metrics.features` (0.2): this alias keeps ``import jaxdiff.features`` working."""

import sys
import warnings

from jaxdiff.metrics import features as _features

warnings.warn("jaxdiff.features moved to jaxdiff.metrics.features; import it from there.", DeprecationWarning, 2)
sys.modules[__name__] = _features
