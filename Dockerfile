# Tollway's image: `tollway serve` (default), `tollway render-envoy`, `tollway keys`, and the
# demo upstream (standard library only). Runtime dependencies only: no test extras.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
# A virtualenv copied whole into the runtime stage; pip compiles the bytecode here, so the
# running container writes none (read-only root filesystem).
RUN python -m venv /opt/tollway \
 && /opt/tollway/bin/pip install --no-cache-dir . \
 && /opt/tollway/bin/pip uninstall --yes pip

FROM python:3.11-slim
COPY --from=build /opt/tollway /opt/tollway
ENV PATH=/opt/tollway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOLLWAY_CONFIG=/etc/tollway/tollway.yaml
# Writable places, owned by the tollway user (a named volume mounted there starts with
# this owner): the keys file's folder, and where render-envoy writes Envoy's config.
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin tollway \
 && mkdir -p /var/lib/tollway /run/tollway/envoy \
 && chown 10001:10001 /var/lib/tollway /run/tollway/envoy
USER 10001:10001
WORKDIR /var/lib/tollway
EXPOSE 50051 9464
# Liveness on the metrics port (metrics.port, 9464): the standard library, no curl here.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:9464/healthz', timeout=2)"]
ENTRYPOINT ["tollway"]
CMD ["serve"]
