# syntax=docker/dockerfile:1
#
# smtp-relay container image.
#
#   docker compose up -d            (see README.md, section "Docker")
#   docker build -t smtp-relay .    (the same image by hand)
#
# Two stages on the same official slim Python base (pinned to a patch release, so rebuilds are reproducible;
# bump it on purpose, for security releases):
#   builder  turns the project and every dependency into wheels (`pip wheel`); nothing of it reaches the image.
#   runtime  installs only those wheels into a virtual environment (no index, no compilers, no build tools),
#            then runs as an unprivileged user with a fixed uid/gid (10001), so volume ownership can be planned.
# No secret is baked in: credentials come from the environment or from Docker secrets (*_FILE variables).

FROM python:3.11.13-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# ---------------------------------------------------------------------------------------------------------------
FROM base AS builder
WORKDIR /src
# Only what the package build needs (README.md is the package's long description); .dockerignore keeps the rest
# of the repository (tests, .git, virtual environments, .env, certificates, logs) out of the build context.
COPY pyproject.toml README.md ./
COPY smtp_relay/ ./smtp_relay/
# Every dependency publishes binary wheels for linux/amd64 and linux/arm64, so no compiler is needed here either.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------------------------------
FROM base AS runtime

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The wheels are bind-mounted from the builder stage, so they never become a layer of this image.
# pip compiles the bytecode at install time; at run time nothing is written next to the code
# (PYTHONDONTWRITEBYTECODE), which is what lets the container run with a read-only root filesystem. The base image
# ships the standard library without bytecode: compiled here once, or every start and every health check would
# compile it again (about half a second of CPU each).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/pip" install --no-cache-dir --no-index --find-links=/wheels smtp-relay \
    && python -m compileall -q -j 0 -x '/(test|idlelib|tkinter|lib2to3|turtledemo|site-packages)/' \
       /usr/local/lib/python3.11 \
    && smtp-relay --version

# The unprivileged user. /var/log (LOG_FILE) belongs to it, so that a fresh named volume, an anonymous volume or
# a tmpfs mounted there is writable; /etc/certs stays root-owned and is only read (TLS_CERT_FILE / TLS_KEY_FILE).
RUN groupadd --system --gid 10001 smtp-relay \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin smtp-relay \
    && chown 10001:10001 /var/log \
    && chmod 0755 /var/log \
    && install -d -o root -g root -m 0755 /etc/certs

# A volume at /var/log even when none is named, so `docker run --read-only` works out of the box.
VOLUME ["/var/log"]

# Numeric, so that Kubernetes' runAsNonRoot and similar checks can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /

EXPOSE 1025
# The relay finishes the transactions in flight on SIGTERM (up to TIMEOUT seconds): give `docker stop` time for it
# (docker-compose.yml sets stop_grace_period accordingly).
STOPSIGNAL SIGTERM

# `smtp-relay healthcheck` reads the same environment as the relay, connects to its own listener on loopback,
# expects the 220 greeting and EHLO 250 (and STARTTLS when USE_TLS is on), then QUITs. It never authenticates.
# --start-interval (Docker Engine 25+): probed every 2 s while starting, so it shows healthy within seconds.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --start-interval=2s --retries=3 \
    CMD ["smtp-relay", "healthcheck"]

ENTRYPOINT ["smtp-relay"]
