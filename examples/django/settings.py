"""Settings of the Django example: the least Django needs, plus the metrics middleware.

``DjangoRouteMiddleware`` hands each request's URL pattern and a view's exception type
to the WSGI middleware wrapped around the application in ``wsgi.py``.
"""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]
ROOT_URLCONF = "examples.django.urls"
INSTALLED_APPS: list[str] = []
MIDDLEWARE = ["victor_mp_metrics.wsgi.DjangoRouteMiddleware"]
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
LOGGING = {"version": 1, "disable_existing_loggers": False}
