"""The Django example's WSGI application, with request metrics. From the repository root::

    gunicorn -c gunicorn.conf.py examples.django.wsgi:application
"""

import os

from django.core.wsgi import get_wsgi_application
from victor_mp_metrics.wsgi import MetricsMiddleware

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django.settings")
application = MetricsMiddleware(get_wsgi_application())
