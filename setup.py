"""Package layout: the folders ``optim/`` and ``service/`` install as ``zerotrain.optim``
and ``zerotrain.service`` (everything else is in pyproject.toml)."""

from setuptools import find_packages, setup

TOP_LEVEL = ("optim", "service")

setup(
    packages=[f"zerotrain.{name}" for name in find_packages(include=[f"{t}*" for t in TOP_LEVEL])],
    package_dir={f"zerotrain.{name}": name for name in TOP_LEVEL},
)
