# ccproxy container image: two stages, the runtime one holding only the interpreter and the venv.
#
#   docker build -t ccproxy .
#   docker run --read-only --tmpfs /tmp -v ccproxy-state:/var/lib/ccproxy -v ccproxy-logs:/var/log/ccproxy \
#       -v "$PWD/etc-ccproxy:/etc/ccproxy:ro" -p 8443:8443 ccproxy
#
# It runs as uid/gid 1000 and works with a read-only root filesystem: the only paths it writes are
# the volumes below (syslog audit spool and chain heads; audit files) and /tmp; the config (and its
# TLS certificate and key) is mounted read-only at /etc/ccproxy. See deploy/kubernetes.yaml.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml setup.cfg README.md MANIFEST.in ./
COPY ccproxy ./ccproxy
COPY twisted ./twisted
COPY etc ./etc
COPY systemd ./systemd
COPY packaging ./packaging
COPY docs ./docs
RUN python -m venv /opt/ccproxy \
 && /opt/ccproxy/bin/pip install -c packaging/requirements.lock . \
 # Twisted's plugin cache, written now: the image's user cannot write into the venv.
 && /opt/ccproxy/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 # Nothing installs packages at run time.
 && /opt/ccproxy/bin/pip uninstall -y pip

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --gid 1000 ccproxy \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /var/lib/ccproxy --shell /usr/sbin/nologin ccproxy \
 && install -d -m 0750 -o 1000 -g 1000 /var/lib/ccproxy /var/log/ccproxy \
 && install -d -m 0755 /etc/ccproxy \
 && python -m pip uninstall -y pip setuptools wheel
COPY --from=build /opt/ccproxy /opt/ccproxy
# No bytecode writes into the read-only venv; log lines leave at once.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 1000:1000
WORKDIR /var/lib/ccproxy
VOLUME ["/var/lib/ccproxy", "/var/log/ccproxy"]
EXPOSE 8443
# --pidfile= : no pid file (the root filesystem is read-only); logs go to standard output.
ENTRYPOINT ["/opt/ccproxy/bin/twistd", "-n", "--pidfile=", "ccproxy"]
CMD ["--config", "/etc/ccproxy/config.yaml"]
