"""Damage seeded copies of a valid file and read each back, in a process of its own (a crash shows as its exit code).

Usage: python tests/damage_worker.py KIND ORIGINAL WORKDIR COPIES
  KIND: pth (``torch_files.read_tensors``), safetensors (a diffusers folder through ``load_diffusers_unet``) or
  checkpoint (a run's checkpoints: ORIGINAL/checkpoints/{2,4}; step 4 is damaged, ``restore_latest`` reads).

Copy i (``default_rng(i)``) either truncates one file at a random length or overwrites 1 to 4 random bytes of it
with other values; for a folder the file is drawn among its files. Each copy's outcome is one line of JSON on
stdout: ``{"copy": i, "damage": ..., "outcome": "error" | "same" | "changed", ...}`` with the error's type and
message, or for ``changed`` how many bytes of the values differ from the original's.
"""

import json
import os
import pathlib
import shutil
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np


def damage(path: pathlib.Path, rng: np.random.Generator) -> str:
    """Truncate ``path`` or overwrite 1-4 of its bytes; what was done."""
    data = bytearray(path.read_bytes())
    if not data:
        return "empty file left as it is"
    if rng.random() < 0.3:
        size = int(rng.integers(0, len(data)))
        path.write_bytes(bytes(data[:size]))
        return f"{path.name} truncated to {size} of {len(data)} bytes"
    offsets = rng.choice(len(data), size=min(len(data), int(rng.integers(1, 5))), replace=False)
    for offset in offsets:
        data[offset] ^= int(rng.integers(1, 256))  # a different byte, never the same
    path.write_bytes(bytes(data))
    return f"{path.name} bytes {sorted(int(o) for o in offsets)} of {len(data)} changed"


def values(tree) -> np.ndarray:
    """Every array of ``tree``, in order, as one byte string (uint8)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return np.concatenate([np.asarray(x).reshape(-1).view(np.uint8) for x in leaves]) if leaves else np.zeros(0)


def compare(got, want) -> dict:
    got_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(got)[0]]
    want_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(want)[0]]
    if got_paths != want_paths:
        return {"outcome": "changed", "names": "differ"}
    shapes = [np.shape(x) for x in jax.tree_util.tree_leaves(got)]
    if shapes != [np.shape(x) for x in jax.tree_util.tree_leaves(want)]:
        return {"outcome": "changed", "shapes": "differ"}
    a, b = values(got), values(want)
    if a.dtype != b.dtype or a.size != b.size:
        return {"outcome": "changed", "dtypes": "differ"}
    differing = int(np.count_nonzero(a != b))
    return {"outcome": "same"} if differing == 0 else {"outcome": "changed", "bytes_differing": differing}


def reader(kind: str, original: pathlib.Path):
    """(read(path) -> values, the file or folder to damage inside a copy)."""
    if kind == "pth":
        from jaxdiff.models.torch_files import read_tensors

        return read_tensors, lambda copy: [copy]
    if kind == "safetensors":
        from jaxdiff.models import load_diffusers_unet

        def weights_or_config(copy):  # the weights three times in four, the config once
            return [copy / "config.json", *list(copy.glob("*.safetensors")) * 3]

        return (lambda folder: load_diffusers_unet(folder)[0]), weights_or_config
    if kind == "checkpoint":
        from jaxdiff import checkpoints

        def restore(workdir):
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                mngr = checkpoints.manager(workdir, async_save=False)
                try:
                    state, skipped = checkpoints.restore_latest(mngr, TARGET)
                finally:
                    mngr.close()
            return {"state": state, "skipped_steps": [s for s, _ in skipped], "reasons": [r for _, r in skipped]}

        def files(copy):
            return sorted(p for p in (copy / "checkpoints" / "4").rglob("*") if p.is_file())

        return restore, files
    raise ValueError(kind)


def small_state(step: int):
    """The state the checkpoint tests save at ``step``: a few arrays of different dtypes."""
    rng = np.random.default_rng(step)
    return {
        "step": np.int32(step),
        "params": {"w": rng.standard_normal((32, 16)).astype(np.float32), "b": np.arange(16, dtype=np.float32)},
        "count": np.arange(5, dtype=np.int32),
    }


TARGET = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), small_state(4))


def main():
    kind, original, workdir, copies = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), sys.argv[4]
    read, targets = reader(kind, original)
    want = read(original)
    if kind == "checkpoint":
        assert want["skipped_steps"] == [], want
        want = want["state"]
    for i in range(int(copies)):
        copy = workdir / f"copy_{i}"
        if original.is_dir():
            shutil.copytree(original, copy)
        else:
            shutil.copy(original, copy)
        rng = np.random.default_rng(i)
        candidates = targets(copy)
        what = damage(candidates[int(rng.integers(len(candidates)))], rng)
        line = {"copy": i, "damage": what}
        try:
            got = read(copy)
        except Exception as e:  # the outcome under test: which exception, with what message
            line.update(outcome="error", type=type(e).__name__, message=str(e).splitlines()[0][:300] if str(e) else "")
        else:
            if kind == "checkpoint":  # step 4's state, or step 2's after skipping the damaged step 4
                line.update(skipped=got["skipped_steps"], reasons=got["reasons"])
                got = got["state"]
                line["restored_step"] = int(np.asarray(got["step"]))
                want = small_state(2 if line["restored_step"] == 2 else 4)
            line.update(compare(got, want))
        print(json.dumps(line), flush=True)
        shutil.rmtree(copy) if copy.is_dir() else copy.unlink()


if __name__ == "__main__":
    main()
