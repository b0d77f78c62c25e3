"""The wheel holds every package and the bundled corpus: built from the project's files,
installed with pip into a folder outside the checkout, it plans and trains (python -m
megalite.plan, the megalite-train script) with the checkout out of reach."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env=None, timeout=300):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, text=True, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.returncode == 0, f"{cmd}: exit {proc.returncode}\n{proc.stdout[-4000:]}"
    return proc.stdout


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    src, dist, site, work = (tmp_path / d for d in ("src", "dist", "site", "work"))
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("megalite", "kernels"):
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    log = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-index",
                "--no-build-isolation", "-w", dist, src], cwd=tmp_path)
    assert "Deprecat" not in log, [line for line in log.splitlines() if "Deprecat" in line]
    wheel = next(dist.glob("megalite-*.whl"))
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", site,
          wheel], cwd=tmp_path)

    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1",
           "MEGALITE_DEVICE": "cpu"}
    env.pop("MEGALITE_FAULT", None)
    # One interpreter: where every module comes from, then python -m megalite.plan's main.
    out = _run([sys.executable, "-c", "import sys, megalite, megalite.kernels, megalite.plan, "
                "megalite.train; from megalite.training.data import default_corpus_path; "
                "print(megalite.__file__, megalite.kernels.__file__, megalite.plan.__file__, "
                "megalite.train.__file__, default_corpus_path()); "
                "from megalite.plan.__main__ import main; sys.exit(main(sys.argv[1:]))",
                "--model", "tiny", "--gpus", "2", "--seq-len", "32", "--global-batch-size", "4",
                "--gpu-memory", "1GB", "--top", "1", "--rejected", "0"], cwd=work, env=env)
    where = out.splitlines()[0].split()
    # every module from the install, none from the checkout (its editable install)
    assert len(where) == 5 and all(path.startswith(str(site)) for path in where), where
    assert "torchrun --nproc-per-node 2 -m megalite.train --model tiny" in out, out
    train = _run([site / "bin" / "megalite-train", "--steps", "2", "--seq-len", "32",
                  "--global-batch-size", "4", "--log-interval", "1"], cwd=work, env=env)
    assert "done: steps 1..2" in train, train
