"""Where the names that moved in 0.2 live now: the old import paths keep working, with a DeprecationWarning.

``MODULES`` maps a module kept only as an alias to its new home; ``NAMES`` maps an old dotted name to its new one
(the CHANGELOG lists both; ``tests/test_moved.py`` imports every old path). :func:`moved` is what an old module's
``__getattr__`` calls.
"""

from __future__ import annotations

import importlib
import warnings

_BOUND = ("DECODERS", "VariationalBound", "discretized_gaussian_log_likelihood", "gaussian_log_likelihood")
_BOUND += ("normal_kl", "prior_bpd", "variational_bound", "vb_term_bpd")
_LOSSES = ("LOSS_TYPES", "WEIGHTINGS", "check_objective", "diffusion_loss", "snr_weight", "training_losses")
_FID = ("FeatureStats", "feature_stats", "frechet_distance", "inception_score", "load_precomputed_stats")
_FID += ("sample_quality",)
_REFERENCE = ("cache_dir", "class_reference_stats", "reference_stats", "streamed_feature_stats")

MODULES = {
    "jaxdiff.features": "jaxdiff.metrics.features",
    "jaxdiff.models.inception": "jaxdiff.metrics.inception",
}

NAMES = {
    **{f"jaxdiff.diffusion.{name}": f"jaxdiff.bound.{name}" for name in _BOUND},
    **{f"jaxdiff.diffusion.{name}": f"jaxdiff.losses.{name}" for name in _LOSSES},
    **{f"jaxdiff.evaluation.{name}": f"jaxdiff.metrics.fid.{name}" for name in _FID},
    **{f"jaxdiff.evaluation.{name}": f"jaxdiff.metrics.reference.{name}" for name in _REFERENCE},
}


def moved(module: str, name: str):
    """The object ``module.name`` that moved (see ``NAMES``), with a DeprecationWarning naming its new path.

    Raises:
      AttributeError: ``module.name`` never existed.
    """
    new = NAMES.get(f"{module}.{name}")
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(f"{module}.{name} moved to {new}; import it from there.", DeprecationWarning, stacklevel=3)
    new_module, new_name = new.rsplit(".", 1)
    return getattr(importlib.import_module(new_module), new_name)
