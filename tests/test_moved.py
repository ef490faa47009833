"""The names that moved in 0.2 (jaxdiff/_moved.py, CHANGELOG.md) keep their old import paths: each old path gives the
very object of its new home, with a DeprecationWarning that names the new path. The package faces keep every name
they had."""

import importlib
import subprocess
import sys
import warnings

import pytest

from jaxdiff import _moved
from tests.helpers import ROOT

# Every import path of 0.1 that a user could have written, by face: the names that stay where they were.
FACES_OF_0_1 = {
    "jaxdiff.samplers": [
        "SAMPLERS",
        "ODE_SAMPLERS",
        "DETERMINISTIC_SAMPLERS",
        "DEFAULT_SPACINGS",
        "Trajectory",
        "sampling_schedule",
        "respaced",
        "check_eta",
        "ddpm_step",
        "ddim_step",
        "ddpm_sample",
        "ddim_sample",
        "ddim_invert",
        "dynamic_threshold",
        "predictions_between_steps",
        "dpm_solver_sample",
        "heun_sample",
        "check_strength",
        "sdedit",
        "repaint_path",
        "check_mask",
        "repaint_sample",
        "guided",
        "autoguided",
    ],
    "jaxdiff.pipeline": [
        "DiffusionConfig",
        "ModelSpec",
        "Pipeline",
        "T_SAMPLINGS",
        "DDPM_PROCESS",
        "from_spec",
        "params_like",
        "from_workdir",
        "autoguided",
        "from_diffusers",
        "from_release",
        "from_checkpoint",
        "check_images_fit",
        "Edit",
        "check_request",
        "make_sampler",
        "labels_for",
        "generate",
        "make_bound_fn",
        "make_ode_bpd_fn",
    ],
    "jaxdiff.data": [
        "KNOWN_DATASETS",
        "READERS",
        "Digits",
        "DataConfig",
        "load_split",
        "InMemory",
        "Streamed",
        "open_split",
        "num_classes",
        "resize_square",
        "global_indices",
        "Batches",
        "make_batches",
    ],
    "jaxdiff.diffusion": [
        "PREDICTIONS",
        "VARIANCES",
        "LEARNED_VARIANCES",
        "ModelFn",
        "check_choice",
        "key_per_example",
        "fold_keys",
        "normal_noise",
        "extract",
        "mean_flat",
        "q_step_mean_variance",
        "q_mean_variance",
        "q_sample",
        "q_posterior_mean_variance",
        "predict_x0_from_eps",
        "predict_eps_from_x0",
        "v_from_x0_eps",
        "predict_x0_from_v",
        "predict_eps_from_v",
        "posterior_mean_from_eps",
        "prediction_target",
        "x0_and_eps",
        "x0_and_eps_at",
        "PMeanVariance",
        "split_model_output",
        "predictions_from_output",
        "p_mean_variance",
    ],
    "jaxdiff.evaluation": ["TERMS", "SplitBound", "bound_over_split", "ode_bpd_over_split"],
}


@pytest.mark.parametrize("face", sorted(FACES_OF_0_1))
def test_the_faces_keep_their_names_without_a_warning(face):
    module = importlib.import_module(face)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        missing = [name for name in FACES_OF_0_1[face] if not hasattr(module, name)]
    assert not missing, f"{face} lost {missing}"
    assert set(FACES_OF_0_1[face]) <= set(module.__all__), f"{face}.__all__ lacks some of them"


@pytest.mark.parametrize("old", sorted(_moved.NAMES))
def test_a_moved_name_is_its_new_object_with_a_warning(old):
    new = _moved.NAMES[old]
    old_module, name = old.rsplit(".", 1)
    new_module, new_name = new.rsplit(".", 1)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        got = getattr(importlib.import_module(old_module), name)
    assert got is getattr(importlib.import_module(new_module), new_name)
    assert name in importlib.import_module(new_module).__all__


def test_an_unknown_name_is_still_an_attribute_error():
    import jaxdiff.diffusion

    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        jaxdiff.diffusion.no_such_name


@pytest.mark.parametrize(("old", "new"), sorted(_moved.MODULES.items()))
def test_a_moved_module_imports_as_its_new_home_with_a_warning(old, new):
    # A fresh interpreter: the alias warns once, on its first import.
    probe = (
        "import importlib, warnings, sys\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module({old!r})\n"
        f"new = importlib.import_module({new!r})\n"
        "assert old is new, (old, new)\n"
        f"assert any(issubclass(w.category, DeprecationWarning) and {new!r} in str(w.message) for w in caught)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
