# An S3-compatible server for the test suite (moto's server mode; MinIO cannot be had here),
# from the same registry-free Debian base as the session image.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
ARG MOTO_VERSION=5.2.5
COPY build-ca.crt /usr/local/share/ca-certificates/ccgate-build-ca.crt
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && (update-ca-certificates >/dev/null 2>&1 || true)
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN python3 -m venv /opt/moto \
 && /opt/moto/bin/pip install --no-cache-dir "moto[server]==${MOTO_VERSION}"
EXPOSE 5000
ENTRYPOINT ["/opt/moto/bin/moto_server", "-H", "0.0.0.0", "-p", "5000"]
