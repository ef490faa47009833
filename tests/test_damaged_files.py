"""Files that cannot hurt: 200 seeded damaged copies (truncated, or 1-4 bytes changed) of a valid PyTorch ``.pth``, a
diffusers folder with ``.safetensors`` weights, and a run's checkpoints, each read back in a process of its own
(``tests/damage_worker.py``), so that a crash of the interpreter fails the test instead of ending it.

Each copy gives a clear error (jaxdiff's CheckpointError, a ValueError, that names the file and what is wrong), or
values equal to the original's; only where the format has no checksum of its values (safetensors) may a changed byte
of the values come back, and then only that byte: nothing is read out of bounds.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT

COPIES = 200


def damaged_reads(kind, original, tmp_path, subprocess_env) -> list[dict]:
    work = tmp_path / "copies"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "damage_worker.py"), kind, str(original), str(work), str(COPIES)],
        capture_output=True,
        text=True,
        timeout=900,
        env=subprocess_env,
        cwd=ROOT,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    last = lines[-1]["damage"] if lines else "none"
    crash = f"exit {result.returncode} after copy {len(lines) - 1} ({last}): {result.stderr[-3000:]}"
    assert result.returncode == 0, crash
    assert [line["copy"] for line in lines] == list(range(COPIES))
    return lines


def assert_errors_are_clear(lines, names_file):
    errors = [line for line in lines if line["outcome"] == "error"]
    for line in errors:
        assert line["type"] == "CheckpointError" and names_file(line["message"]), line
    return errors


@pytest.mark.torch
def test_damaged_pth_files_give_a_clear_error_or_the_original_tensors(tmp_path, subprocess_env):
    torch = pytest.importorskip("torch", reason="needs torch (to write the original): pip install torch==2.13.0")
    torch.manual_seed(0)
    base = torch.randn(6, 8)
    state = {"w": base, "view": base[1:, ::2], "b": torch.arange(5, dtype=torch.float32), "n": torch.tensor([3, 1])}
    original = tmp_path / "weights.pth"
    torch.save(state, original)
    lines = damaged_reads("pth", original, tmp_path, subprocess_env)
    # The zip's CRC-32 covers every member: a changed byte never comes back as a value.
    assert {line["outcome"] for line in lines} <= {"error", "same"}, [x for x in lines if x["outcome"] == "changed"]
    errors = assert_errors_are_clear(lines, lambda m: "copy_" in m and ("PyTorch" in m or "storage" in m))
    assert len(errors) >= COPIES // 2


@pytest.mark.torch
def test_damaged_safetensors_give_a_clear_error_or_at_most_the_changed_bytes(tmp_path, subprocess_env):
    from tests.helpers import diffusers_unet
    from tests.test_convert import SMALL

    folder = tmp_path / "unet"
    diffusers_unet(**SMALL["attention-learned-sigma-classes"]).save_pretrained(folder, safe_serialization=True)
    lines = damaged_reads("safetensors", folder, tmp_path, subprocess_env)
    # Each error names the file, or the setting or tensor at fault (a config that parses but is not a DDPM UNet's,
    # tensors that a changed name or shape no longer matches).
    named = ("copy_", "not a DDPM-family UNet", "missing", "unexpected", "shape")
    errors = assert_errors_are_clear(lines, lambda m: any(word in m for word in named))
    changed = [line for line in lines if line["outcome"] == "changed"]
    for line in changed:  # safetensors keeps no checksum: a changed byte of a value reads back as that byte, alone
        assert "bytes_differing" in line and "truncated" not in line["damage"], line
        assert line["damage"].startswith("diffusion_pytorch_model.safetensors"), line
        assert line["bytes_differing"] <= line["damage"].count(",") + 1, line
    assert errors and changed  # both kinds of damage were met


def test_damaged_checkpoints_fall_back_to_the_one_before_with_the_reason(tmp_path, subprocess_env):
    """Step 4 of two checkpoints is damaged: the restore gives step 4's state exactly, or reports step 4 unreadable
    and gives step 2's. Orbax and TensorStore keep no checksum of small arrays: changed bytes of a value are caught by
    the fingerprint saved with each checkpoint."""
    from jaxdiff import checkpoints
    from tests.damage_worker import small_state

    mngr = checkpoints.manager(tmp_path / "run", async_save=False)
    for step in (2, 4):
        checkpoints.save(mngr, step, small_state(step), {"seed": 0}, {"network": {}})
    checkpoints.wait(mngr)
    mngr.close()
    lines = damaged_reads("checkpoint", tmp_path / "run", tmp_path, subprocess_env)
    assert {line["outcome"] for line in lines} == {"same"}, [x for x in lines if x["outcome"] != "same"]
    fallbacks = [line for line in lines if line["restored_step"] == 2]
    assert all(line["skipped"] == [4] and line["reasons"] for line in fallbacks)
    assert all(line["restored_step"] == 4 and not line["skipped"] for line in lines if line not in fallbacks)
    assert len(fallbacks) >= COPIES // 10
    assert any("differs from the fingerprint" in line["reasons"][0] for line in fallbacks)


def test_the_fingerprint_changes_with_any_one_bit_of_any_array():
    from jaxdiff.checkpoints import fingerprint

    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.standard_normal((7, 5)).astype(np.float32),
        "bf16": rng.standard_normal(9).astype("bfloat16") if hasattr(np, "bfloat16") else np.ones(9, np.float16),
        "i32": rng.integers(-5, 5, 11).astype(np.int32),
        "flags": rng.random(6) < 0.5,
    }
    base = fingerprint(tree)
    assert set(base) == set(tree) and base == fingerprint({k: v.copy() for k, v in tree.items()})
    # The documented formula in Python's integers (what checkpoints saved by earlier versions hold): the words of
    # the array's own width, sum_i (2 i + 1) w_i mod 2^32.
    for name, array in tree.items():
        raw = array.view(np.uint8) if array.dtype == np.bool_ else array
        words = [int(w) for w in raw.reshape(-1).view(f"uint{8 * raw.dtype.itemsize}")]
        assert base[name] == sum((2 * i + 1) * w for i, w in enumerate(words)) % 2**32, name
    for name, array in tree.items():
        raw = array.reshape(-1).view(np.uint8)
        for byte in range(raw.size):
            for bit in range(8):
                flipped = raw.copy()
                flipped[byte] ^= 1 << bit
                changed = fingerprint({**tree, name: flipped.view(array.dtype).reshape(array.shape)})
                assert changed[name] != base[name], (name, byte, bit)
                assert {k: v for k, v in changed.items() if k != name} == {k: v for k, v in base.items() if k != name}


def test_weights_in_the_hugging_face_cache_are_checked_against_their_digest(tmp_path):
    """The hub's cache keeps a large file as ``blobs/<its SHA-256>`` behind a snapshot link: a changed byte there is
    an error before any tensor is read, where a folder of its own could not tell."""
    import hashlib

    from safetensors.numpy import save_file

    from jaxdiff.models import convert

    plain = tmp_path / "w.safetensors"
    save_file({"w": np.arange(6, dtype=np.float32)}, str(plain))
    data = plain.read_bytes()
    blob = tmp_path / "models--x--y" / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    snapshot = tmp_path / "models--x--y" / "snapshots" / "abc123" / "diffusion_pytorch_model.safetensors"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(blob)
    np.testing.assert_array_equal(convert._read_weights(snapshot)["w"], np.arange(6))
    changed = bytearray(data)
    changed[-1] ^= 0x40  # the last byte of the last value: safetensors itself reads it without complaint
    blob.write_bytes(bytes(changed))
    plain.write_bytes(bytes(changed))
    assert convert._read_weights(plain)["w"][-1] != 5  # outside the cache: no digest to check against
    with pytest.raises(ValueError, match=r"has changed since it was downloaded.*download it again"):
        convert._read_weights(snapshot)
