# The hub: one process serving WebSocket and HTTP on port 9001, configured by HUB_* variables
# (README, "Operations"). Build: docker build -t hub .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies in their own layer: rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt

COPY README.md ./
COPY hub ./hub
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info

RUN groupadd --system --gid 10001 hub \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin hub
USER 10001:10001

ENV HUB_HOST=0.0.0.0 \
    HUB_PORT=9001
EXPOSE 9001

# /healthz: the process is up. Readiness (/readyz) is for the load balancer, not for restarts.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HUB_PORT', '9001') + '/healthz', timeout=2)"]

# SIGTERM drains (closes trackers with 1012, exits 0 within HUB_DRAIN_TIMEOUT, default 10 s):
# give the container a longer stop timeout than that (docker stop -t 15, stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["hub", "serve", "--host", "0.0.0.0"]
