# Reference image: the Flask app under Gunicorn with multiprocess metrics.
#
#   docker build -t victor-mp-metrics .
#   docker run --rm -p 8000:8000 -p 9090:9090 \
#       --tmpfs /run/victor-metrics:uid=10001,mode=0700 victor-mp-metrics
#
# Settings are environment variables (see the README's table), e.g. -e VICTOR_WORKERS=8.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed UID/GID so that `--tmpfs ...:uid=10001` and volume ownership can name it.
RUN groupadd --system --gid 10001 victor \
    && useradd --system --uid 10001 --gid victor --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin victor

WORKDIR /srv/victor

# The code stays owned by root so the app user cannot rewrite it.
COPY pyproject.toml README.md gunicorn.conf.py ./
COPY victor_mp_metrics/ ./victor_mp_metrics/
COPY app/ ./app/
RUN pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info

# Every worker mmaps its metric files here, so it must be private to the app user
# (mode 0700) and should be memory-backed: mount it as tmpfs,
#   docker run --tmpfs /run/victor-metrics:uid=10001,mode=0700 ...
# A tmpfs also starts empty on every container start, so no stale files of a previous
# run are aggregated. Without the flag Docker creates an anonymous volume from this
# directory (same owner and mode), which works but lives on disk.
ENV PROMETHEUS_MULTIPROC_DIR=/run/victor-metrics
RUN install -d -m 0700 -o victor -g victor /run/victor-metrics
VOLUME ["/run/victor-metrics"]

# The default bind is loopback; in a container the app must listen on all interfaces.
ENV VICTOR_BIND=0.0.0.0:8000 \
    VICTOR_METRICS_PORT=9090 \
    VICTOR_METRICS_ADDR=0.0.0.0
# 8000: the app; 9090: aggregated /metrics served by the Gunicorn master.
EXPOSE 8000 9090

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# slim images ship no curl; urlopen raises on errors and non-2xx, which exits 1 (unhealthy).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["gunicorn", "-c", "gunicorn.conf.py", "app:app"]
