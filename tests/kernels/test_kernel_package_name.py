"""The top-level kernels/ folder is megalite.kernels; run from the repository root (which
puts the root on sys.path), ``import kernels`` must still reach the PyPI package of that
name, which transformers >= 5.25 imports. Breakage checked: without the hand-over at the
top of kernels/__init__.py, ``import kernels`` returns our folder and this test fails (and
so does every Hugging Face test under ``python -m pytest``)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import kernels
import megalite.kernels as ours
print(kernels.__file__)
print(kernels.CUDAProperties)
print(ours.__file__, callable(ours.attention))
"""


def test_import_kernels_from_the_repository_root_gets_the_pypi_package(tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("CUDAProperties = 'the PyPI package'\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pypi_file, marker, ours = proc.stdout.strip().splitlines()
    assert Path(pypi_file).resolve() == (fake / "__init__.py").resolve()
    assert marker == "the PyPI package"
    assert Path(ours.split()[0]).resolve() == ROOT / "kernels" / "__init__.py"
    assert ours.split()[1] == "True"
