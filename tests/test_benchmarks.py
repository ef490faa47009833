"""The benchmark scripts' own logic: the accelerator benchmark's smoke run, its peak table, the process harness."""

import importlib.util
import json
import pathlib
import sys

import pytest

from tests.helpers import ROOT


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def accelerator():
    return _script("accelerator")


@pytest.fixture(scope="module")
def versus():
    return _script("versus")


def test_the_accelerator_benchmark_runs_on_a_cpu(accelerator, tmp_path):
    """The smoke run on configs/tiny.py: every figure present and consistent with the others. The float32 train step
    only (a bfloat16 step is the same code with another dtype; the sampling runs in bfloat16)."""
    out = tmp_path / "acc.json"
    assert accelerator.main(["--smoke", "--config=configs/tiny.py", "--dtypes=float32", f"--json={out}"]) == 0
    result = json.loads(out.read_text())
    assert result["machine"]["platform"] == "cpu" and result["machine"]["device_count"] >= 1
    assert [row["dtype"] for row in result["train"]] == ["float32"]
    for row in result["train"]:
        assert row["loss_finite"] and row["compile_seconds"] > 0 and row["xla_memory_bytes"] > 0
        assert row["images_per_sec"] == pytest.approx(row["steps_per_sec"] * row["batch"])
        assert row["steps_per_sec"] == pytest.approx(row["timed_steps"] / row["seconds"])
        # A train step is a forward, a backward of about twice its cost, and an optimizer update: ~3 forwards.
        assert 2.5 < row["flops_per_step"] / row["forward_flops"] < 4.5
        assert row["mfu"] is None and row["peak_flops_per_sec"] is None  # a CPU has no entry in the peak table
    ddpm, fast = result["sampling"]
    assert ddpm["dtype"] == fast["dtype"] == "bfloat16"
    assert (ddpm["sampler"], ddpm["steps"], fast["sampler"], fast["steps"]) == ("ddpm", 4, "dpm++2m", 3)
    for row in result["sampling"]:
        assert row["finite"] and row["images_per_sec"] == pytest.approx(row["batch"] / row["seconds"])


def test_the_peak_table_takes_the_most_specific_device_name():
    from jaxdiff.flops import peak_flops, utilisation

    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12  # not the SXM part's figure
    assert peak_flops("NVIDIA H200", "float32") == 494e12
    assert peak_flops("TPU v5 lite", "bfloat16") == 197e12  # v5e, not v5p
    assert peak_flops("TPU v5p", "bfloat16") == 459e12
    assert peak_flops("Tesla V100-SXM2-16GB", "bfloat16") is None
    assert peak_flops("cpu", "float32") is None
    # The log line's figure: FLOPs per device times steps/s, and its share of the peak where the device is known.
    assert utilisation(2e12, 50.0, "NVIDIA H100 80GB HBM3", "bfloat16") == "100 TFLOP/s/device (MFU 10.1%)"
    assert utilisation(2e9, 3.0, "cpu", "float32") == "0.006 TFLOP/s/device"
    assert utilisation(None, 3.0, "cpu", "float32") == ""


def test_the_harness_alternates_processes_and_takes_ratios_pair_by_pair(versus, monkeypatch):
    order = []
    seconds = {"jax": iter([1.0, 3.0, 2.0]), "torch": iter([2.0, 2.0, 2.0])}

    def fake_worker(workload, side, repeats):
        order.append(side)
        return {"seconds": next(seconds[side])}

    monkeypatch.setattr(versus, "run_worker", fake_worker)
    result = versus.compare("train_digits", pairs=3, repeats=1, log=lambda s: None)
    assert order == ["jax", "torch"] * 3
    assert [p["ratio"] for p in result["pairs"]] == [0.5, 1.5, 1.0]
    assert result["jax_over_torch"] == {"median": 1.0, "min": 0.5, "max": 1.5}


def test_the_machine_record_names_the_cpu(versus):
    record = versus.machine()
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        assert record["cpu"] in cpuinfo.read_text()
        flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
        assert set(record["isa"]) == {f for f in versus.ISA_FLAGS if f in flags}
    assert record["cores"] >= 1 and record["versions"]["jax"]


def test_the_worker_gets_the_cpu_flag_only_where_the_workload_asks(versus, monkeypatch):
    seen = {}

    class Done:
        returncode, stderr = 0, ""
        stdout = 'RESULT {"seconds": 1.0}'

    def fake_run(cmd, env, **kwargs):
        seen[cmd[3]] = env["XLA_FLAGS"]
        return Done()

    monkeypatch.setattr(versus.subprocess, "run", fake_run)
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=1 {versus.FAST_CPU_CONVOLUTIONS}")
    versus.run_worker("fwd_bwd_cifar10", "jax", 1)
    versus.run_worker("fwd_bwd_cifar10_noflag", "jax", 1)
    assert versus.FAST_CPU_CONVOLUTIONS in seen["fwd_bwd_cifar10"]
    assert seen["fwd_bwd_cifar10_noflag"] == "--xla_force_host_platform_device_count=1"


@pytest.mark.slow
def test_one_real_pair_of_processes(versus):
    """The harness end to end on the cheapest workload: both sides run in their own processes and agree on the work
    (50 steps per run, one step's time reported)."""
    result = versus.compare("sample_digits", pairs=1, repeats=1, log=lambda s: None)
    pair = result["pairs"][0]
    assert pair["jax"]["seconds"] > 0 and pair["torch"]["seconds"] > 0
    assert pair["jax"]["xla_flags"] and versus.FAST_CPU_CONVOLUTIONS in pair["jax"]["xla_flags"]


def test_with_an_older_tree_each_round_runs_it_first_and_takes_after_over_before(versus, monkeypatch):
    calls = []
    seconds = {None: iter([1.0, 2.0]), "/tmp/old": iter([2.0, 2.0]), "torch": iter([4.0, 4.0])}

    def fake_worker(workload, side, repeats, xla_flags=None, root=None):
        calls.append(root if side == "jax" else side)
        return {"seconds": next(seconds["torch" if side == "torch" else root])}

    monkeypatch.setattr(versus, "run_worker", fake_worker)
    result = versus.compare("train_digits_32", pairs=2, repeats=1, log=lambda s: None, before="/tmp/old")
    assert calls == ["/tmp/old", None, "torch"] * 2
    assert result["after_over_before"] == {"median": 0.75, "min": 0.5, "max": 1.0}
    assert result["before_over_torch"]["median"] == 0.5 and result["jax_over_torch"]["median"] == 0.375


@pytest.fixture(scope="module")
def cpu_flags():
    return _script("cpu_flags")


def test_the_flag_sweep_alternates_entries_and_reports_a_flag_xla_refuses(cpu_flags, monkeypatch):
    order = []
    seconds = {"a": iter([1.0, 2.0, 1.0]), "b": iter([0.5, 3.0, 1.5])}

    def fake_worker(workload, side, repeats, xla_flags=None):
        name = {"": "a", "--x": "b", "--bad": "c"}[xla_flags]
        order.append(name)
        if name == "c":
            raise SystemExit("train_digits_32 (jax) failed:\nUnknown flag in XLA_FLAGS: --bad")
        return {"seconds": next(seconds[name])}

    monkeypatch.setattr(cpu_flags, "run_worker", fake_worker)
    entries = cpu_flags.parse_flags("a=;b=--x;c=--bad")
    result = cpu_flags.sweep("train_digits_32", entries, rounds=3, repeats=1, log=lambda s: None)
    assert order == ["a", "b", "c", "a", "b", "a", "b"]  # a refused entry is not run again
    assert result["entries"]["b"]["over_reference"] == {"median": 1.5, "min": 0.5, "max": 1.5}
    assert "Unknown flag" in result["entries"]["c"]["failed"]
    with pytest.raises(SystemExit, match="at least two entries"):
        cpu_flags.parse_flags("a=")


def test_the_hlo_count_finds_layout_copies_and_their_bytes():
    hlo_ops = _script("hlo_ops")
    entry = """ENTRY %main (p: f32[8,32,32,128]) -> f32[3,3,128,128] {
  %p = f32[8,32,32,128]{3,2,1,0} parameter(0)
  %transpose_copy_fusion.3 = f32[128,32,32,8]{3,2,1,0} fusion(%p), kind=kLoop, calls=%fused_computation.1
  %convolution.1 = f32[128,3,3,128]{3,2,1,0} convolution(%transpose_copy_fusion.3, %p), dim_labels=b01f_01io->b01f
  %bitcast.2 = f32[128,3,3,128]{3,2,1,0} bitcast(%convolution.1)
  ROOT %wrapped_copy.1 = bf16[3,3,128,128]{3,2,1,0} fusion(%bitcast.2), kind=kLoop, calls=%wrapped_copy_computation
}"""
    counts = hlo_ops.count(entry)
    assert counts["operations"] == 3 and counts["convolutions"] == 1 and counts["layout_copies"] == 2
    assert counts["layout_copy_megabytes"] == (128 * 32 * 32 * 8 * 4 + 9 * 128 * 128 * 2) / 2**20


def test_the_groupnorm_benchmark_loads_another_trees_group_norm_and_wants_both_before_arguments(tmp_path):
    """``--before=TREE``: that tree's ``group_norm`` (here this tree's, so equal to it); the ``before`` variant
    without the tree, or a folder without jaxdiff, stops with what to pass."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.models.norm import group_norm

    speed = _script("groupnorm_speed")
    loaded = speed._group_norm_of(str(ROOT))
    assert loaded is not group_norm
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)) * 3 + 50
    scale, bias = jnp.linspace(0.5, 2, 8), jnp.linspace(-1, 1, 8)
    assert bool(jnp.all(loaded(x, scale, bias, 4) == group_norm(x, scale, bias, 4)))
    with pytest.raises(SystemExit, match="go together"):
        speed.main(["--variants=fused,before"])
    with pytest.raises(SystemExit, match=r"has no jaxdiff/models/norm\.py"):
        speed._group_norm_of(str(tmp_path))
