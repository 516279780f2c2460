"""A plain WSGI app behind the generic middleware, whose /exit/<code> ends its worker."""

from __future__ import annotations

import os
from typing import Any

from victor_mp_metrics.wsgi import MetricsMiddleware, set_endpoint


def _app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    path = environ["PATH_INFO"]
    if path.startswith("/exit/"):
        os._exit(int(path.removeprefix("/exit/")))
    set_endpoint(environ, "/ok" if path == "/ok" else "<unmatched>")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]


app = MetricsMiddleware(_app)
