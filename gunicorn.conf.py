"""Gunicorn configuration of the Victor AI reference service.

Settings come from the environment (see the README's configuration table); command-line
flags such as ``-w`` and ``-b`` still override them. The metrics hooks come from the
library, so your own config can import the same ones.
"""

import os

from victor_mp_metrics.gunicorn_hooks import (  # noqa: F401 - Gunicorn looks these up by name
    child_exit,
    on_exit,
    on_reload,
    on_starting,
    post_fork,
    settings_or_exit,
    use_default_directory,
    when_ready,
    worker_abort,
)

use_default_directory()
_settings = settings_or_exit()

bind = [_settings.bind]
workers = _settings.workers
worker_class = _settings.worker_class
threads = _settings.threads
timeout = _settings.timeout
max_requests = _settings.max_requests
max_requests_jitter = _settings.max_requests_jitter
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
# Gunicorn 27's control socket is one path per user; several masters would fight over it.
control_socket_disable = True
