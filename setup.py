"""Only the optional C extension lives here; everything else is in pyproject.toml.

``optional=True``: without a C compiler the package installs without it and
``victor_mp_metrics._mpdir._writer`` uses the same writes in Python.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("victor_mp_metrics._mpdir._speedups", ["victor_mp_metrics/_mpdir/_speedups.c"],
                  optional=True),
    ],
)
