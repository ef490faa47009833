"""The commands as a user meets them: installed from a wheel, quiet, and one line for each mistake.

- The installed tool: a wheel built from the checkout, installed into a fresh venv (its dependencies are this
  environment's, seen through a .pth line), runs ``jaxdiff-train --config=tiny`` and ``jaxdiff-sample`` from a folder
  outside the checkout. The same run is the console check: the digits are built afresh (a new data directory), and
  nothing that :data:`FOREIGN` lists may appear in what the commands print.
- Errors: each documented mistake prints one line, ``<command>: <what to do>``, exits with 2, and shows no traceback.
- The console's parts: TensorFlow's start-up lines dropped and its warnings kept; configs by name.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import numpy as np
import pytest

from jaxdiff import _extras, commands, experiment
from jaxdiff.cli import config_lookup, quiet
from jaxdiff.errors import ConfigError, MissingExtraError
from tests.helpers import ROOT, fake_run

#: What other libraries print that the commands must not show (the issue's list, and what was seen before #33).
FOREIGN = {
    "an absl log line (W/I/E prefix)": re.compile(r"^[WIE]\d{4} "),
    "absl's uninitialised-log notice": re.compile(r"All log messages before absl::InitializeLog"),
    "TensorFlow's oneDNN banner": re.compile(r"oneDNN"),
    "TFDS's variant-folder warning": re.compile(r"Variant folder"),
    "TFDS's build messages": re.compile(r"Downloading and preparing|downloaded and prepared|Generating splits"),
    "Orbax's read-only warnings": re.compile(r"read only|read_only"),
    "TFDS's OpenCV notice": re.compile(r"OpenCV"),
    "a Python warning": re.compile(r"\w+Warning: "),
    "a traceback": re.compile(r"^Traceback "),
}


def foreign_lines(output: str) -> list[str]:
    return [f"{what}: {line}" for line in output.splitlines() for what, p in FOREIGN.items() if p.search(line)]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv holding the wheel of the checkout; the rest of the stack is this environment's. Returns its bin/."""
    where = tmp_path_factory.mktemp("installed")
    # Built from a copy of what the wheel holds: setuptools leaves a build/ folder where it builds.
    source = where / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("jaxdiff", "configs"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = where / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            f"--wheel-dir={wheels}",
            source,
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("jaxdiff-*.whl")
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    own = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # This environment's packages, after the venv's own (a plain path line: its .pth files, among them the editable
    # install's finder, are not read, so `jaxdiff` can only come from the wheel).
    pathlib.Path(own, "stack.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return wheel, venv / "bin"


def test_the_wheel_carries_every_package_and_config(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("jaxdiff", "jaxdiff/cli", "jaxdiff/configs", "jaxdiff/data", "jaxdiff/models", "jaxdiff/samplers"):
        assert f"{package}/__init__.py" in names, package
    shipped = {p.name for p in (ROOT / "configs").glob("*.py")}
    assert {n.removeprefix("jaxdiff/configs/") for n in names if n.startswith("jaxdiff/configs/")} == shipped
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "jaxdiff-train = jaxdiff.cli.train:main" in text and "jaxdiff-sample = jaxdiff.cli.sample:main" in text


def test_the_installed_commands_train_and_sample_quietly_outside_the_checkout(installed, tmp_path, subprocess_env):
    _, bin_dir = installed
    env = {k: v for k, v in subprocess_env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    where = subprocess.run(
        [str(bin_dir / "python"), "-c", "import jaxdiff.configs as c, jaxdiff as j; print(j.__file__, c.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(ROOT) not in where and str(bin_dir.parent) in where, where

    run = lambda *argv: subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    data_dir = tmp_path / "tfds"  # empty: the run builds the digits, the noisiest step before #33
    trained = run(
        "jaxdiff-train",
        "--config=tiny",
        "--workdir=run",
        "--config.training.num_steps=2",
        f"--config.data.data_dir={data_dir}",
    )
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    assert "Building the digits dataset" in trained.stdout and (data_dir / "digits").is_dir()
    sampled = run("jaxdiff-sample", "--workdir=run", "--num_samples=3", "--sampler=ddim", "--steps=3")
    assert sampled.returncode == 0, sampled.stdout[-3000:] + sampled.stderr[-3000:]
    with np.load(tmp_path / "run" / "samples" / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 8, 8, 1) and f["arr_0"].dtype == np.uint8
    for result in (trained, sampled):
        assert foreign_lines(result.stdout + result.stderr) == [], result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------- one-line errors

TRAIN = [sys.executable, str(ROOT / "train.py"), "--config=tiny"]
SAMPLE = [sys.executable, str(ROOT / "sample.py")]

ERRORS = {
    "a misspelled key": (
        [*TRAIN, "--workdir={w}", "--config.training.num_stepz=3"],
        r"no setting 'num_stepz' in the config .*Did you mean \"num_steps\"",
    ),
    "a value of the wrong type": ([*TRAIN, "--workdir={w}", "--config.optim.lr=fast"], r"could not convert .*'fast'"),
    "a bad value": ([*TRAIN, "--workdir={w}", "--config.optim.lr=-1"], r"Need lr > 0"),
    "an unknown dataset": ([*TRAIN, "--workdir={w}", "--config.data.dataset=nosuch"], r"Unknown dataset 'nosuch'"),
    "a dataset not prepared": (
        [*TRAIN, "--workdir={w}", "--config.data.dataset=cifar10", "--config.data.data_dir={w}/tfds"],
        r"'cifar10' is not prepared in .*`tfds build cifar10",
    ),
    "an impossible network": ([*TRAIN, "--workdir={w}", "--config.model.ch=30"], r"not divisible by num_groups=32"),
    "an unknown config": ([*TRAIN[:2], "--config=tinyy", "--workdir={w}"], r"No shipped config named 'tinyy'.*tiny"),
    "a missing workdir flag": (TRAIN, r"--workdir must have a value"),
    "a missing checkpoint": ([*SAMPLE, "--workdir={w}/none"], r"No checkpoint in .*: train first \(jaxdiff-train"),
    "an unknown flag": ([*SAMPLE, "--workdir={w}", "--stepz=3"], r"Unknown command line flag 'stepz'"),
    "both model flags": ([*SAMPLE, "--workdir={w}", "--pretrained={w}"], r"exactly one of --workdir .* --pretrained"),
}


@pytest.mark.parametrize("mistake", list(ERRORS))
def test_a_mistake_is_one_line_and_exit_status_2(mistake, tmp_path, subprocess_env):
    argv, message = ERRORS[mistake]
    argv = [a.replace("{w}", str(tmp_path)) for a in argv]
    result = subprocess.run(argv, env=subprocess_env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(rf"(train|sample)\.py: .*{message}", lines[0]), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert foreign_lines(result.stdout) == []


def test_verbose_gives_the_traceback(tmp_path, subprocess_env):
    argv = [*TRAIN, f"--workdir={tmp_path}", "--config.optim.lr=-1", "--verbose"]
    result = subprocess.run(argv, env=subprocess_env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError: Need lr > 0" in result.stderr


# ---------------------------------------------------------------------------------------------------- the console


def test_tensorflow_start_up_lines_are_dropped_and_its_warnings_kept():
    startup = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796599060.644656    9647 port.cc:153] oneDNN custom operations are on. You may see ...",
        "I1206 23:10:41.620168 140203583265664 cpu_feature_guard.cc:227] This TensorFlow binary is optimized ...",
        "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
        "appropriate compiler flags.",
    ]
    kept = [
        "W0000 00:00:1796599060.644656    9647 gpu_device.cc:2344] Cannot dlopen some GPU libraries.",
        "E1206 23:10:41.620168 1402 cuda_dnn.cc:8579] Unable to register cuDNN factory",
        "Some line of a library's own",
    ]
    dropped = lambda line: any(p.search(line) for p in quiet.TENSORFLOW_STARTUP)
    assert all(dropped(line) for line in startup) and not any(dropped(line) for line in kept)


def _fake_tensorflow(tmp_path, *lines: bytes, then: str = "") -> dict:
    """A stand-in ``tensorflow`` package under ``tmp_path`` that writes ``lines`` to file descriptor 2 on import, then
    runs ``then``; the environment that finds it."""
    fake = tmp_path / "tensorflow"
    fake.mkdir()
    writes = "".join(f"os.write(2, {line!r})\n" for line in lines)
    (fake / "__init__.py").write_text(f"import os\n{writes}{then}\n")
    return {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}


STARTUP = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    b"I0000 00:00:1796599060.644656    9647 port.cc:153] oneDNN custom operations are on.\n",
)
WARNING = "W0000 00:00:1796599060.644656    9647 port.cc:9] a real warning"
QUIET = "from jaxdiff.cli import quiet\nquiet.quiet(False)\n"


def test_the_first_tensorflow_import_filters_stderr_at_the_file_descriptor(tmp_path):
    """After quiet(), TensorFlow's start-up lines written to file descriptor 2 on import are dropped and its warning
    kept; a lookup (find_spec) does not use up the filter; stderr is whole again after the import."""
    env = _fake_tensorflow(tmp_path, *STARTUP, f"{WARNING}\n".encode())
    script = QUIET + (
        "import importlib.util, os, sys\n"
        "assert importlib.util.find_spec('tensorflow') is not None\n"
        "import tensorflow\n"
        "os.write(2, b'I0000 00:00:1.0 1 port.cc:1] after the import: not filtered\\n')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [WARNING, "I0000 00:00:1.0 1 port.cc:1] after the import: not filtered"]


def test_what_tensorflow_writes_before_a_crash_still_shows(tmp_path):
    """The filter is a process of its own: an import that aborts the interpreter loses none of its lines."""
    env = _fake_tensorflow(tmp_path, *STARTUP, b"F0000 00:00:1.0 1 port.cc:2] fatal: no such CPU\n", then="os.abort()")
    result = subprocess.run(
        [sys.executable, "-c", QUIET + "import tensorflow"], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert result.stderr.splitlines() == ["F0000 00:00:1.0 1 port.cc:2] fatal: no such CPU"]


def test_verbose_is_read_as_absl_reads_it(monkeypatch):
    monkeypatch.delenv("JAXDIFF_VERBOSE", raising=False)
    assert quiet.verbose(["x", "--verbose"]) and quiet.verbose(["x", "--verbose=true"])
    assert not quiet.verbose(["x"]) and not quiet.verbose(["x", "--verbose", "--noverbose"])
    assert not quiet.verbose(["x", "--verbose=false"])
    monkeypatch.setenv("JAXDIFF_VERBOSE", "1")
    assert quiet.verbose(["x"]) and not quiet.verbose(["x", "--noverbose"])


def test_the_extra_finder_speaks_only_for_jaxdiffs_own_imports(monkeypatch):
    """On a core install, ``import <a train-extra package>`` in a jaxdiff module names the extra; the same import in
    any other module, and a lookup (``importlib.util.find_spec``) even from jaxdiff, get Python's own answer."""
    import importlib.util

    missing = "jaxdiff_test_missing_package"
    monkeypatch.setattr(_extras, "TRAIN_MODULES", _extras.TRAIN_MODULES | {missing})
    monkeypatch.setattr(sys, "meta_path", [*sys.meta_path, _extras.ExtraFinder])
    with pytest.raises(MissingExtraError, match=r"jaxdiff\.fake needs '.*', .*pip install 'jaxdiff\[train\]'"):
        exec(f"import {missing}", {"__name__": "jaxdiff.fake"})
    with pytest.raises(ModuleNotFoundError) as elsewhere:
        exec(f"import {missing}", {"__name__": "users_code"})
    assert not isinstance(elsewhere.value, MissingExtraError)
    assert eval(f"util.find_spec({missing!r})", {"__name__": "jaxdiff.fake", "util": importlib.util}) is None


def test_configs_by_name_and_by_path(tmp_path):
    named = config_lookup.resolve_config("digits")
    assert pathlib.Path(named).is_file() and named.endswith("digits.py")
    assert config_lookup.resolve_config("tiny:arg").endswith("tiny.py:arg")
    cifar10 = str(ROOT / "configs" / "cifar10.py")
    assert config_lookup.resolve_config(cifar10) == cifar10
    shipped = {p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__"}
    assert set(config_lookup.config_names()) == shipped
    with pytest.raises(ConfigError, match="No shipped config named 'digit'"):
        config_lookup.resolve_config("digit")
    with pytest.raises(ConfigError, match=r"No config file 'configs/nope\.py'"):
        config_lookup.resolve_config("configs/nope.py")


def test_eval_fid_samples_with_the_runs_training_time_fid_sampler(tmp_path):
    """--eval=fid without --sampler: the sampler and steps of the run's own training-time FID, read from the config its
    checkpoint stores (configs/tiny.py's: DDIM over 50 steps); an imported model's: DDIM over 100."""
    fake_run(tmp_path / "run")
    run = str(tmp_path / "run")
    request = commands.resolved(commands.SampleRequest(workdir=run, eval="fid"))
    assert (request.sampler, request.sampling_steps) == ("ddim", 50)
    assert commands.resolved(commands.SampleRequest(pretrained="x", eval="fid")).sampler == commands.FID_SAMPLER[0]
    evaluation = experiment.EvaluationConfig()  # FID_SAMPLER is the training-time FID's default, kept as a literal
    assert commands.FID_SAMPLER == (evaluation.sampler, evaluation.steps)  # so that sampling needs no ml_collections
    drawing = commands.resolved(commands.SampleRequest(workdir=run))
    assert (drawing.sampler, drawing.sampling_steps) == ("ddpm", None)  # drawing: ancestral over all T
    chosen = commands.resolved(commands.SampleRequest(workdir=run, eval="fid", sampler="dpm++2m", steps=20))
    assert (chosen.sampler, chosen.sampling_steps) == ("dpm++2m", 20)
    fewer = commands.resolved(commands.SampleRequest(workdir=run, eval="fid", steps=10))
    assert (fewer.sampler, fewer.sampling_steps) == ("ddim", 10)


def test_the_former_flag_names_still_work_and_sampling_writes_nothing_into_the_run(tmp_path, subprocess_env):
    """``--step`` (now ``--checkpoint_step``) picks the checkpoint, with a line naming the new flag; both names at once
    are refused in one line. Sampling leaves the run's checkpoint folder as it was, file for file."""
    fake_run(tmp_path / "run")
    folder = tmp_path / "run" / "checkpoints"
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}
    argv = [*SAMPLE, f"--workdir={tmp_path / 'run'}", "--num_samples=2", "--sampler=ddim", "--steps=2"]
    run = lambda *extra: subprocess.run(
        [*argv, *extra], env=subprocess_env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    old = run("--step=3")
    assert old.returncode == 0, old.stderr[-3000:]
    assert "--step is deprecated: use --checkpoint_step (the same setting)." in old.stdout
    assert "(step 3, EMA)" in old.stdout and foreign_lines(old.stdout + old.stderr) == []
    both = run("--step=3", "--checkpoint_step=3")
    assert both.returncode == 2 and both.stderr.strip() == (
        "sample.py: --step is the former name of --checkpoint_step: pass only --checkpoint_step."
    )
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))} == before
