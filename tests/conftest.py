"""Test configuration: float64 available, strict dtype promotion, fixture loading.

Warnings are errors (pyproject.toml). Multi-device tests fake CPU devices in a
subprocess, because XLA_FLAGS must be set before jax is imported.
"""

import json
import os
import pathlib

# The tests check values, not speed: LLVM's optimisation of the CPU kernels
# (XLA's backend optimisation level; the HLO passes, fusion included, still
# run) was about 40% of the suite's CPU time. Subprocesses (examples, several
# hosts) inherit it through the environment. Benchmarks run without it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# On a GPU every pytest-xdist worker (-n auto: one per core) preallocates 75% of
# the same card's memory by default: on an H100 with 16 workers 16 RoI tests
# failed at once (the error text was cut off) that pass with -n0. Allocate on
# demand instead (no effect on a CPU).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_disable_most_optimizations",
                  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] not in ("0", "false", "False"))
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
# The tests check values: float32 matrix products in full float32 on every
# backend, as on a CPU (XLA's default on NVIDIA GPUs is TF32, ~1e-3 relative:
# the float32 fixtures failed on an H200 without this). deform_conv's
# precision=None follows this setting, as lax.conv does.
jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def fixture_names(op):
    return sorted(p.stem for p in (FIXTURES / op).glob("*.npz"))


def load_fixture(op, name):
    """Returns (arrays, meta) for tests/fixtures/<op>/<name>.npz."""
    with np.load(FIXTURES / op / f"{name}.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "meta"}
        meta = json.loads(str(z["meta"]))
    return arrays, meta


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# The longest tests (subprocesses that compile whole models) go first, so that with
# pytest-xdist both workers stay busy until the end instead of one finishing them alone.
_LONG_FIRST = ("test_multihost.py", "test_multidevice.py", "test_examples.py", "test_docs.py",
               "test_nnx.py", "test_dcnv3.py", "test_interop.py")


# The longest single tests of those files, first of all (measured: 45-75 s each).
_LONGEST = ("test_dcn_resnet_quick_from_a_safetensors_checkpoint",
            "test_two_processes_hold_identical_parameters_equal_to_one_process",
            "test_readme_python_blocks_run",
            "test_sharded_jit_pmap_and_model_parallel_match_one_device")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        if item.originalname in _LONGEST:
            return -1
        name = item.path.name
        return _LONG_FIRST.index(name) if name in _LONG_FIRST else len(_LONG_FIRST)

    items.sort(key=rank)  # stable: the order within each file is kept
