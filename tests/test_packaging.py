"""What a user installs: typed, licensed, complete, and telling when an extra is missing."""

import os
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import pytest

ROOT = pathlib.Path(__file__).parents[1]

USER_SCRIPT = '''
import jax.numpy as jnp
import deformjax

sizes: list[str] = deformjax.receptive_field([(3, 1, 1)])
count: int = deformjax.deform_conv(jnp.ones((1, 4, 4, 1)), jnp.zeros((1, 4, 4, 18)),
                                   jnp.ones((3, 3, 1, 1)), padding=1)
deformjax.layer_geometry(3, strides=1.5)
'''


def test_mypy_sees_the_types_of_a_user_script(tmp_path):
    """Three deliberate type errors, three reports. (mypy cannot follow setuptools'
    editable-install hook, so the checkout is named with MYPYPATH here; an installed
    wheel is found through its py.typed, which the build test checks is shipped.)"""
    pytest.importorskip("mypy")
    script = tmp_path / "user.py"
    script.write_text(USER_SCRIPT)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--cache-dir", str(tmp_path / "c"),
         "--follow-imports=silent", str(script)],
        capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, MYPYPATH=str(ROOT)),
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert [line.split(":")[1] for line in errors] == ["5", "6", "8"], result.stdout


def test_wheel_and_sdist_ship_license_and_types_but_no_partial_tests(tmp_path):
    pytest.importorskip("build")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    (sdist,) = tmp_path.glob("*.tar.gz")
    names = zipfile.ZipFile(wheel).namelist()
    assert "deformjax/py.typed" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    assert not any(name.startswith("tests/") for name in names)
    members = tarfile.open(sdist).getnames()
    top = members[0].split("/")[0]
    assert f"{top}/LICENSE" in members and f"{top}/deformjax/py.typed" in members
    assert not any("/tests/" in name for name in members)


def test_viz_without_matplotlib_names_the_extra():
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "try:\n    import deformjax.viz\nexcept ImportError as e:\n    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "pip install 'deformjax[viz]'" in result.stdout, result.stdout + result.stderr
