"""The docstring examples run and print what they say; the docs site builds and its code runs."""

import doctest
import importlib
import pathlib
import re

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


DOCS = pathlib.Path(__file__).parents[1] / "docs"
API_MODULES = ("deformjax", "deformjax.nnx", "deformjax.models", "deformjax.interop",
               "deformjax.viz")


def _documented_names():
    """{module: names} listed by the autosummary directives of docs/api.md."""
    listed, module = {}, None
    for line in (DOCS / "api.md").read_text().splitlines():
        line = line.strip()
        if line.startswith(".. currentmodule::"):
            module = line.split("::")[1].strip()
        elif module and line and not line.startswith((".", ":", "`", "#")) and " " not in line:
            listed.setdefault(module, set()).add(line)
    return listed


def test_every_public_name_has_an_api_entry_with_its_shapes():
    listed = _documented_names()
    shape = re.compile(r"``\([^`]*\)``")  # a shape such as ``(N, H, W, C)``
    for name in API_MODULES:
        module = importlib.import_module(name)
        public = {n for n in module.__all__ if n not in ("linen", "nnx")}
        missing = public - listed.get(name, set())
        assert not missing, f"docs/api.md lists no entry for {name}.{sorted(missing)}"
        for n in public:
            assert shape.search(getattr(module, n).__doc__ or ""), (
                f"{name}.{n}: its docstring states no shape")


def _page_blocks():
    return [(page.name, re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
            for page in sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", [name for name, blocks in _page_blocks() if blocks])
def test_docs_python_blocks_run(page):
    """Every Python block of a page runs, in order, in one namespace per page (as a reader
    pastes them), with JAX's default dtypes and promotion."""
    blocks = dict(_page_blocks())[page]
    with jax.enable_x64(False), jax.numpy_dtype_promotion("standard"):
        exec(compile("\n".join(blocks), str(DOCS / page), "exec"), {})


def test_docs_site_builds_without_warnings(tmp_path):
    """sphinx-build -W (warnings are errors), offline, on a copy of docs/ (autosummary
    writes its generated pages next to the sources)."""
    import shutil
    import subprocess
    import sys

    source = tmp_path / "docs"
    shutil.copytree(DOCS, source, ignore=shutil.ignore_patterns("_build", "generated"))
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(source),
         str(tmp_path / "html")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    html = tmp_path / "html"
    assert (html / "index.html").exists() and (html / "api.html").exists()
    assert (html / "generated" / "deformjax.deform_conv.html").exists()
