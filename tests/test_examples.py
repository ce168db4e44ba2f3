"""The examples run end to end in their quick form (subprocesses, float32 as users run them)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


def run_example(name, *args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr  # stderr too: progress bars would show there


def test_quickstart(tmp_path):
    out = run_example("quickstart.py", "--quick", "--out", str(tmp_path))
    assert "deform_conv      (2, 32, 32, 16) -> (2, 32, 32, 32)" in out
    assert "[3, 7, 15]" in out and "nonzero: True" in out
    assert (tmp_path / "quickstart.png").stat().st_size > 10_000


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_deformable_digits_quick(tmp_path, api):
    out = run_example("deformable_digits.py", "--quick", "--epochs", "1", "--api", api, "--out",
                      str(tmp_path))
    assert f"API: {api}" in out and "SMOKE RUN (--quick)" in out
    assert "\r" not in out  # no progress bar when not on a terminal
    rows = {m.group(1): (int(m.group(2).replace(",", "")), float(m.group(3)))
            for m in re.finditer(r"^(plain|deformable)\s+([\d,]+)\s+([\d.]+)", out, re.M)}
    assert set(rows) == {"plain", "deformable"}, out
    assert all(0.0 <= acc <= 1.0 for _, acc in rows.values())
    assert abs(rows["plain"][0] - rows["deformable"][0]) < 0.05 * rows["plain"][0]
    assert (tmp_path / "sampling_locations.png").stat().st_size > 10_000


def test_receptive_fields_quick(tmp_path):
    out = run_example("receptive_fields.py", "--quick", "--out", str(tmp_path))
    assert "[3, 7, 15]" in out
    assert re.search(r"dilated 2-2-2 \(gridding\)\s+13\s+49\s", out), out
    for name in ("dilated_receptive_fields.png", "effective_receptive_fields.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_roi_pooling_quick(tmp_path):
    # 40 steps per head instead of --quick's 150: enough for the offsets to move, and
    # the example's code paths are the same (the suite's time is what it saves).
    out = run_example("roi_pooling.py", "--quick", "--steps", "40", "--out", str(tmp_path))
    assert re.search(r"^RoIAlign\s+[\d.]+$", out, re.M) and re.search(
        r"^deformable\s+[\d.]+$", out, re.M), out
    moved = float(re.search(r"mean \|gamma \* offset\| = ([\d.]+)", out).group(1))
    assert moved > 0  # the zero-initialised offset branch learned to move the bins
    assert (tmp_path / "deformed_rois.png").stat().st_size > 10_000
    assert "read levels [0, 0, 1, 2, 3]" in out, out  # 12, 24, 44, 80, 150 px, finest_scale 16
    assert (tmp_path / "fpn_levels.png").stat().st_size > 10_000


def test_dcnv3_block_quick(tmp_path):
    out = run_example("dcnv3_block.py", "--quick", "--out", str(tmp_path))
    assert "SMOKE RUN (--quick)" in out
    accuracy = float(re.search(r"DCNv3 network: [\d,]+ parameters, test accuracy ([\d.]+)",
                               out).group(1))
    assert 0.0 <= accuracy <= 1.0
    assert (tmp_path / "dcnv3_points.png").stat().st_size > 10_000


def test_dcn_resnet_quick_from_a_safetensors_checkpoint(tmp_path):
    """The example loads a torchvision-format .safetensors file (the narrow ResNet-18 of
    the interop fixtures) into its deformable backbone and runs a few steps."""
    import numpy as np
    from safetensors.numpy import save_file

    with np.load(ROOT / "tests" / "fixtures" / "interop" / "resnet18_frozen.npz") as z:
        weights = {k[len("state."):]: z[k] for k in z.files if k.startswith("state.")}
    save_file(weights, str(tmp_path / "r18.safetensors"))
    out = run_example("dcn_resnet.py", "--checkpoint", str(tmp_path / "r18.safetensors"),
                      "--depth", "18", "--width", "8", "--size", "64", "--quick", "--out",
                      str(tmp_path))
    assert f"loaded {len(weights) - 2} tensors" in out  # all but fc.weight, fc.bias
    diff, scale = (float(v) for v in re.search(
        r"step 0: the logits equal the plain ResNet with conv2 of c3-c5 halved .*: "
        r"max \|diff\| ([\d.e+-]+) \(max \|logit\| ([\d.]+)\)", out).groups())
    assert diff <= 1e-5 * scale, out
    assert "SMOKE RUN (--quick)" in out
    assert (tmp_path / "dcn_resnet_sampling.png").stat().st_size > 10_000
