"""Test configuration: float64 available, strict dtype promotion, fixture loading.

Warnings are errors (pyproject.toml). Multi-device tests fake CPU devices in a
subprocess, because XLA_FLAGS must be set before jax is imported.
"""

import json
import pathlib

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")

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
