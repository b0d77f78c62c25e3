"""Package discovery (the rest of the metadata is in pyproject.toml).

Every package under megalite/ is found automatically, and the top-level kernels/ folder
(with any subpackage it gains) is installed as ``megalite.kernels``, a mapping that
pyproject's ``packages.find`` cannot express."""
from setuptools import find_packages, setup

KERNELS = ["megalite.kernels"] + [f"megalite.kernels.{p}" for p in find_packages("kernels")]

setup(packages=find_packages(include=["megalite", "megalite.*"]) + KERNELS,
      package_dir={"megalite.kernels": "kernels"})
