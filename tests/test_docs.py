"""The docstring examples run and print what they say."""

import doctest
import importlib

import jax
import pytest

MODULES = [
    "deformjax._src.ops.deform_conv",
    "deformjax._src.ops.dilated_conv",
    "deformjax._src.ops.deform_roi_pool",
    "deformjax._src.tools.receptive_field",
    "deformjax._src.linen.conv",
    "deformjax._src.linen.roi_pool",
    "deformjax._src.linen.aspp",
    "deformjax._src.nnx.conv",
    "deformjax._src.nnx.roi_pool",
    "deformjax._src.nnx.aspp",
    "deformjax._src.ops.dcnv3",
    "deformjax._src.linen.dcnv3",
    "deformjax._src.nnx.dcnv3",
    "deformjax._src.models.resnet",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    # As a user runs them: default float32 and standard promotion.
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


def test_public_api():
    import deformjax
    import deformjax.interop
    import deformjax.models
    import deformjax.nnx

    for module in (deformjax, deformjax.nnx, deformjax.models, deformjax.interop):
        for name in module.__all__:
            assert getattr(module, name).__doc__, f"{module.__name__}.{name}"


def test_readme_python_blocks_run():
    import pathlib
    import re

    import jax

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks
    with jax.numpy_dtype_promotion("standard"):
        exec(compile("\n".join(blocks), "README.md", "exec"), {})
