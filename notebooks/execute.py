"""Run the notebooks top to bottom, each in a fresh kernel, and store them with their outputs and a record of the run.

    python notebooks/execute.py                        # all four
    python notebooks/execute.py 02_train_digits.ipynb  # the named ones

It runs the full notebooks (``JAXDIFF_NOTEBOOK_FAST`` unset, unlike the tests), offline (``HF_HUB_OFFLINE=1``: nothing
is downloaded), from ``notebooks/`` and with Matplotlib's inline backend, as a reader's Jupyter does. A notebook is
written back in place only when every cell ran; a failing cell is reported and the file is left as it was. Each
written notebook gets

- ``metadata["jaxdiff"]``: the date, the command that remakes it, the CPU, the wall time and the JAX version;
- a markdown cell right after its title saying the same to a reader (inserted, or updated on a later run).

Cells keep their outputs, images included, but not nbclient's per-cell timings, which would change every line of a
diff on every run. The notebooks use ``runs/digits`` and ``runs/digits_cond`` and train them when missing (the
quickstart's ``python train.py --config=configs/digits.py --workdir=runs/digits`` makes the first).
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys
import time

import nbclient
import nbformat

NOTEBOOKS = pathlib.Path(__file__).resolve().parent
NAMES = ["01_the_math.ipynb", "02_train_digits.ipynb", "03_pretrained_ddpm.ipynb", "04_fast_sampling.ipynb"]
RECORD_CELL_ID = "run-record"  # the markdown cell this script owns, right after the title
LARGE_BYTES = 2_000_000  # a stored notebook above this is reported: its figures may want a look


def cpu_model() -> str:
    """The CPU's model name as lscpu gives it, e.g. 'AMD EPYC 7B13'."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            return value.strip()
    return "unknown CPU"


def read_notebook(path: pathlib.Path) -> nbformat.NotebookNode:
    """The notebook, every cell with an id: a missing one gets 'cell-NN' from its index, not nbformat's random one."""
    raw = json.loads(path.read_text())
    taken = {cell["id"] for cell in raw["cells"] if "id" in cell}
    for index, cell in enumerate(raw["cells"]):
        if "id" not in cell:
            cell_id = f"cell-{index:02d}"
            while cell_id in taken:
                cell_id += "x"
            cell["id"] = cell_id
            taken.add(cell_id)
    return nbformat.reads(json.dumps(raw), as_version=4)


def run_record_text(record: dict) -> str:
    return (
        f"Outputs stored from a full run on {record['executed']}, {record['cpu']} ({record['cores']} cores), "
        f"{record['seconds']:.0f} s, offline: `{record['command']}`"
    )


def store_record(notebook: nbformat.NotebookNode, record: dict) -> None:
    """Write the record into the notebook's metadata and into the markdown cell after the title."""
    notebook.metadata["jaxdiff"] = record
    cells = notebook.cells
    existing = [i for i, cell in enumerate(cells) if cell.get("id") == RECORD_CELL_ID]
    for i in reversed(existing):
        del cells[i]
    cells.insert(1, nbformat.v4.new_markdown_cell(run_record_text(record), id=RECORD_CELL_ID))


def execute(path: pathlib.Path, timeout: int) -> float:
    """Run the notebook at ``path`` in a fresh kernel and write it back with its outputs; return the seconds taken.

    Raises:
      nbclient.exceptions.CellExecutionError: a cell failed (the file is not written).
    """
    notebook = read_notebook(path)
    # tqdm's note that this headless kernel has no Jupyter widgets is about the run, not the notebook: not stored.
    warnings = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not found"]))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",  # plt.show() stores a PNG; agg would show nothing
        "PYTHONWARNINGS": warnings,
    }
    env.pop("JAXDIFF_NOTEBOOK_FAST", None)  # the full run
    client = nbclient.NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,  # no per-cell start and end times in the cells' metadata
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    start = time.perf_counter()
    client.execute(env=env)
    seconds = time.perf_counter() - start
    record = {
        "executed": datetime.date.today().isoformat(),
        "command": f"python notebooks/execute.py {path.name}",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "seconds": round(seconds),
        "jax": importlib.metadata.version("jax"),
    }
    store_record(notebook, record)
    nbformat.write(notebook, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", default=NAMES, help="names in notebooks/ or paths (default: all four)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds one cell may run before the run fails")
    args = parser.parse_args(argv)
    failed = []
    for name in args.notebooks:
        path = pathlib.Path(name) if pathlib.Path(name).is_file() else NOTEBOOKS / name
        print(f"{path.name}: running ...", flush=True)
        try:
            seconds = execute(path, args.timeout)
        except nbclient.exceptions.CellExecutionError as e:
            print(f"{path.name}: a cell failed, the file is unchanged:\n{e}", file=sys.stderr, flush=True)
            failed.append(path.name)
            continue
        size = path.stat().st_size
        note = f"  (over {LARGE_BYTES / 1e6:.0f} MB: look at its figures)" if size > LARGE_BYTES else ""
        print(f"{path.name}: {seconds:.0f} s, stored {size / 1e6:.2f} MB{note}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
