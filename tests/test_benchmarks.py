"""The benchmark scripts run (tiny sizes on the CPU) and write their JSON; no timing is asserted."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def test_gpu_benchmark_smoke_run(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--smoke", "--no-torch",
         "--shapes", "small", "--dcnv3-stages", "stage4", "--dtypes", "float32", "bfloat16",
         "--out", str(out)],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["smoke"] and report["device"].startswith("cpu")
    assert set(report["results"]) == {"small/float32", "small/bfloat16",
                                      "dcnv3_stage4/float32", "dcnv3_stage4/bfloat16"}
    for name, figures in report["results"].items():
        if name.startswith("dcnv3"):
            assert all(figures[k] > 0 for k in ("deformjax_fwd", "deformjax_fwd_bwd",
                                                "depthwise_conv_fwd", "depthwise_conv_fwd_bwd"))
            continue
        assert all(figures[k] > 0 for k in ("deformjax_fwd", "deformjax_fwd_bwd",
                                            "lax_conv_fwd", "lax_conv_fwd_bwd"))


def test_gpu_policy_benchmark_smoke_run(tmp_path):
    """Each policy compiles its own program (on a CPU the shipped one chunks the derivative at
    1 MiB, tangent_chunks_64MiB does not at this size), and all give the same gradients."""
    out = tmp_path / "policy.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_policy.py"), "--smoke", "--shapes", "A",
         "--batch-scale", "128",  # 2048 rows of 576 bytes: the shipped CPU policy chunks them
         "--policies", "shipped", "no_fence", "tangent_chunks_64MiB", "cpu_layout",
         "--out", str(out)],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())["results"]["A"]
    for policy in ("shipped", "no_fence", "tangent_chunks_64MiB", "cpu_layout"):
        assert figures[f"{policy}_ms"] > 0 and figures[f"{policy}_temp_bytes"] > 0
    assert figures["no_fence_max_rel_diff"] < 1e-5
    assert figures["cpu_layout_max_rel_diff"] < 1e-5
    assert figures["tangent_chunks_64MiB_max_rel_diff"] < 1e-5
    assert figures["shipped_temp_bytes"] < figures["tangent_chunks_64MiB_temp_bytes"]


def test_gpu_policy_refuses_an_unknown_policy(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_policy

    with pytest.raises(ValueError, match="gpu_policy: unknown policy 'fast'"):
        with gpu_policy.policy("fast"):
            pass


def test_sampling_floor_smoke_run(tmp_path):
    """The floor program runs without the sampling arithmetic's fences, the product program
    without any gather; at a one-chunk shape their precomputed index and weights, and
    columns, are the layer's own, so their outputs are the forward's."""
    out = tmp_path / "floor.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sampling_floor.py"), "--shapes", "small",
         "--repeats", "1", "--out", str(out)],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())["cases"]["small"]
    assert figures["one_chunk_max_abs_diff"] == 0.0
    assert figures["one_chunk_product_max_abs_diff"] == 0.0
    # without the coordinates' and the weights' fences: the gather's guard is left
    assert figures["floor_conditionals"] < figures["forward_conditionals"]
    assert figures["product_gathers"] == 0 < figures["forward_gathers"]
    assert figures["sampling_points"] == 2 * 16 * 16 * 9
    assert all(figures[k] > 0 for k in ("forward_ms", "floor_ms", "product_ms", "lax_conv_ms"))


def test_roi_benchmark_smoke_run(tmp_path):
    out = tmp_path / "roi.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_roi.py"), "--smoke", "--no-torch",
         "--cases", "map200", "multi_level", "--out", str(out)],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["smoke"]
    # fpn_p2 is map200's function at another size; ps_rfcn's function has its own tests
    assert set(report["cases"]) == {"map200", "multi_level"}
    for figures in report["cases"].values():
        assert figures["samples"] > 0
        assert all(figures[k] > 0 for k in ("deformjax_fwd", "deformjax_fwd_bwd",
                                            "temp_mib_fwd", "temp_mib_fwd_bwd"))
