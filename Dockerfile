FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY extproc ./extproc
# Runtime dependencies only (no extras): serving and the demo upstream (standard library)
# need nothing else; tests/test_first_run.py proves that install works on its own.
RUN pip install --no-cache-dir . \
 && useradd --system --uid 10001 tollway \
 && mkdir -p /var/lib/tollway && chown tollway /var/lib/tollway
USER tollway
EXPOSE 50051 9464
ENTRYPOINT ["tollway"]
CMD ["serve", "--config", "/etc/tollway/tollway.yaml"]
