"""Only the optional C extensions live here; everything else is in pyproject.toml.

``optional=True``: without a C compiler the package installs without them and uses their
Python twins (``_mpdir._writer``'s ``*_in_python`` writes, ``wsgi._Request``).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("victor_mp_metrics._mpdir._speedups", ["victor_mp_metrics/_mpdir/_speedups.c"],
                  optional=True),
        Extension("victor_mp_metrics._wsgi_request", ["victor_mp_metrics/_wsgi_request.c"],
                  optional=True),
    ],
)
