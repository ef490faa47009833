"""The notebooks run top to bottom, as a reader runs them, in their fast mode (``JAXDIFF_NOTEBOOK_FAST=1``).

They are stored with the outputs of a full run (``python notebooks/execute.py``), which say when and how they were
made; the fast runs here execute a fresh copy in memory, so those stored outputs neither help nor hinder them.

Each notebook asserts its own claims in its cells (the closed forms against simulation, the posterior by completing
the square and by regression, KL = weighted noise error, the bound's terms adding up, the prior term by hand), so a
false claim fails a cell, and a failing cell fails the test. The kernel runs with an empty Hugging Face cache and
``HF_HUB_OFFLINE=1``: nothing is downloaded, whether or not the machine is online.
"""

import datetime
import json
import pathlib

import pytest

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ["01_the_math.ipynb", "02_train_digits.ipynb", "03_pretrained_ddpm.ipynb", "04_fast_sampling.ipynb"]
# The notebooks whose stored run holds figures; 03 draws its images only where the released model loads.
PLOTTED = ["01_the_math.ipynb", "02_train_digits.ipynb", "04_fast_sampling.ipynb"]


def stored_text(source_or_text) -> str:
    """A cell's source or a stream's text as stored: one string, or a list of lines."""
    return source_or_text if isinstance(source_or_text, str) else "".join(source_or_text)


def test_the_notebooks_are_stored_with_the_outputs_of_a_recorded_full_run():
    """What GitHub and the documentation site show: `python notebooks/execute.py` ran each one whole, and said so."""
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NAMES
    for name in NAMES:
        notebook = json.loads((NOTEBOOKS / name).read_text())
        record = notebook["metadata"]["jaxdiff"]
        assert record["command"] == f"python notebooks/execute.py {name}", name
        datetime.date.fromisoformat(record["executed"])
        assert record["cpu"] and record["seconds"] > 0, name
        title, said = notebook["cells"][:2]
        assert stored_text(title["source"]).startswith("# "), name
        assert record["command"] in stored_text(said["source"]), name  # the reader sees how they were made
        code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
        assert code, name
        # Every cell ran, in order, in one kernel, and none failed.
        assert [cell["execution_count"] for cell in code] == list(range(1, len(code) + 1)), name
        outputs = [output for cell in code for output in cell["outputs"]]
        assert all(output["output_type"] != "error" for output in outputs), name
        first = "".join(stored_text(output.get("text", "")) for output in code[0]["outputs"])
        assert "fast mode: False" in first, name  # the full run, not the tests' fast one
        if name in PLOTTED:
            assert any("image/png" in output.get("data", {}) for output in outputs), name


def execute(name: str, env: dict, tmp_path: pathlib.Path):
    """Run every cell of the notebook in a fresh kernel; return the notebook with its outputs, and its stdout."""
    nbformat = pytest.importorskip("nbformat", reason="needs the test extra: pip install -e '.[test]'")
    nbclient = pytest.importorskip("nbclient", reason="needs the test extra: pip install -e '.[test]'")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    kernel_env = {
        **env,
        "JAXDIFF_NOTEBOOK_FAST": "1",
        "JAXDIFF_CACHE": str(tmp_path / "jaxdiff-cache"),
        "HF_HOME": str(tmp_path / "huggingface"),
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "agg",
    }
    client = nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute(env=kernel_env)  # raises CellExecutionError, naming the cell, when a cell fails
    stdout = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.get("name") == "stdout"
    )
    return notebook, stdout


def test_01_the_math(tmp_path, subprocess_env):
    _, out = execute("01_the_math.ipynb", subprocess_env, tmp_path)
    assert "recursion == closed form to 1e-12" in out
    assert "prior term:" in out and "bits/dim; by hand in float64:" in out


def test_02_train_digits(tmp_path, subprocess_env):
    _, out = execute("02_train_digits.ipynb", subprocess_env, tmp_path)
    assert "step 10/10  loss" in out
    assert "Frechet distance" in out and "DDPM 100 steps" in out and "DDIM 10 steps" in out
    assert "10 classes (null class 10), default guidance 0.5" in out and "accuracy" in out


def test_03_offline_says_so_and_stops_cleanly(tmp_path, subprocess_env):
    notebook, out = execute("03_pretrained_ddpm.ipynb", subprocess_env, tmp_path)
    assert "Cannot load google/ddpm-cifar10-32" in out and "Offline, it stops here" in out
    load = next(
        i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code" and "from_checkpoint(" in cell.source
    )
    later = [cell for cell in notebook.cells[load + 1 :] if cell.cell_type == "code"]
    assert later and all(cell.outputs == [] for cell in later)  # the cells after the load did nothing


@pytest.mark.torch
def test_03_samples_and_compares_a_local_copy(tmp_path, subprocess_env):
    """The online path, with a small DDPM-family model saved by diffusers standing in for the released one."""
    from tests.helpers import diffusers_unet  # skips without torch and diffusers

    unet = diffusers_unet(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    folder = tmp_path / "ddpm-copy"
    unet.save_pretrained(folder / "unet")
    (folder / "scheduler").mkdir()
    scheduler = {"beta_schedule": "linear", "num_train_timesteps": 1000, "variance_type": "fixed_large"}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    _, out = execute("03_pretrained_ddpm.ipynb", {**subprocess_env, "JAXDIFF_DDPM_CIFAR10": str(folder)}, tmp_path)
    assert "Cannot load" not in out
    assert "These are NOT the paper's EMA weights" in out  # a diffusers folder: it says which weights it shows
    assert "T = 1000, betas 1.0e-04 .. 0.02," in out and "fixed_large variance" in out
    for name in ("DDPM, 1000 steps", "DDIM, 100 steps", "DDIM, 50 steps"):
        assert f"{name}: " in out and "s for 2 images" in out
    assert "RMS to DDIM 100" in out


def test_04_fast_sampling(tmp_path, subprocess_env):
    _, out = execute("04_fast_sampling.ipynb", subprocess_env, tmp_path)
    assert "'DPM-Solver++ 3M'" in out and "DPM-Solver++ 2M at 20 calls" in out
    assert "mean change per pixel" in out and "test digits: bound" in out and "solver steps" in out
