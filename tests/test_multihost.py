"""Two processes on 127.0.0.1 (gloo CPU collectives, 2 fake devices each) train like one."""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).parents[1]
EXAMPLE = str(ROOT / "examples" / "data_parallel.py")
COMMON = ["--steps", "3", "--batch-size", "16", "--quick"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
    env.pop("XLA_FLAGS", None)
    return subprocess.Popen([sys.executable, EXAMPLE, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process, timeout=400):
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, out + err
    return out


def test_two_processes_hold_identical_parameters_equal_to_one_process(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    workers = [
        start(["--devices", "2", "--coordinator", address, "--num-processes", "2",
               "--process-id", str(i), "--out", str(tmp_path / "two"), *COMMON])
        for i in range(2)
    ]
    try:
        outs = [finish(w) for w in workers]
    finally:  # never leave a worker behind
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    # one process, the same 4 devices' worth of global batch
    single = finish(start(["--devices", "4", "--out", str(tmp_path / "one"), *COMMON]))

    assert "4 devices (cpu) in 2 process(es)" in outs[0] and "step    3" in outs[0]
    ours = ("step", "4 devices", "parameter sharding")  # (gloo logs its own lines)
    assert not [line for line in outs[1].splitlines() if line.startswith(ours)]  # process 0 only
    assert "4 devices (cpu) in 1 process(es)" in single
    def losses(out):
        return [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step")]

    assert len(losses(outs[0])) == 3 and all(np.isfinite(losses(outs[0])))
    np.testing.assert_allclose(losses(outs[0]), losses(single), rtol=1e-5)
    with np.load(tmp_path / "two" / "params_process0.npz") as p0, \
            np.load(tmp_path / "two" / "params_process1.npz") as p1, \
            np.load(tmp_path / "one" / "params_process0.npz") as one:
        assert set(p0.files) == set(one.files) and len(one.files) > 4
        for name in one.files:
            np.testing.assert_array_equal(p0[name], p1[name])
            np.testing.assert_allclose(p0[name], one[name], rtol=1e-5, atol=1e-5)
