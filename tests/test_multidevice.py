"""Data- and model-parallel training on 4 faked CPU devices (in subprocesses)."""

import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).parents[1]


def run(args, devices=4, timeout=600):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def test_sharded_jit_pmap_and_model_parallel_match_one_device():
    result = run([str(ROOT / "tests" / "multidevice_check.py")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "jit + NamedSharding: same parameters as one device" in result.stdout
    assert "pmap + pmean: same parameters as one device" in result.stdout
    assert "model parallel: same output and kernel gradient" in result.stdout
    assert "ALL OK" in result.stdout


def test_data_parallel_example_on_four_devices(tmp_path):
    result = run([str(ROOT / "examples" / "data_parallel.py"), "--devices", "4", "--steps", "6",
                  "--quick"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 devices" in result.stdout
    losses = [float(line.split("loss")[1].split()[0]) for line in result.stdout.splitlines()
              if line.startswith("step")]
    assert len(losses) == 6 and all(np.isfinite(losses))

