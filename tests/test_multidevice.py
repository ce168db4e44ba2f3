"""Data- and model-parallel training on 4 faked CPU devices (in subprocesses)."""

import os
import pathlib
import subprocess
import sys


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


# The data-parallel example on 4 devices (one process) runs in tests/test_multihost.py,
# as the reference the 2-process run must equal.
