# netframe's container image: the greeting server on TCP and UDP port 9999, with
# Prometheus metrics on port 9109 (docs/deployment.md, "Container image").
#
#     docker build -t netframe .
#     docker run --rm -p 9999:9999 -p 9999:9999/udp -p 127.0.0.1:9109:9109 netframe
#
# Arguments after the image name replace the serve flags below:
#
#     docker run --rm -p 7000:7000 netframe --tcp 0.0.0.0:7000 --handler echo
#
# The build stage compiles the hot path with mypyc (a C compiler and the Python headers,
# which the python image has); the image itself has no compiler, only the virtual
# environment the README's install command makes.

ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/netframe
COPY . .
# The README's install command, with the metrics extra; the build must be the compiled one.
RUN python3 tools/make_venv.py \
    && .venv/bin/python -m pip install --no-cache-dir ".[uvloop,metrics]" \
    && .venv/bin/python -m netframe --version | grep compiled

FROM python:${PYTHON_VERSION}-slim
RUN useradd --system --no-create-home --shell /usr/sbin/nologin netframe
# The same path as in the build stage: the environment's scripts name their interpreter.
COPY --from=build /opt/netframe/.venv /opt/netframe/.venv
ENV PATH=/opt/netframe/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1
USER netframe
EXPOSE 9999/tcp 9999/udp 9109/tcp
# netframe drains on SIGTERM (docker stop): keep `docker stop -t` above --shutdown-timeout.
STOPSIGNAL SIGTERM
# Python itself is the container's first process, with no shell in between, so it gets
# the signals; with --workers the supervisor is that process and reaps its workers.
ENTRYPOINT ["python", "-m", "netframe", "serve"]
CMD ["--tcp", "0.0.0.0:9999", "--udp", "0.0.0.0:9999", "--metrics", "0.0.0.0:9109", "--log-format", "json"]
