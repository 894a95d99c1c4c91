# ota-broker in a container: a thin wrapper around the single binary that scripts/build-binary makes.
#
#   docker build -t ota-broker .
#   docker run -d --name ota-broker -p 1883:1883 -p 8883:8883 -p 443:8443 -v ota-data:/data \
#       -e OTA_PUBLIC_URL=https://<host> ota-broker
#
# Downloads are published on the host's 443 and the public URL names no port: iotkit-embedded v3
# devices cannot parse a download URL that names one.
#
# State (database, firmware, generated TLS material, admin token) lives in the /data volume; settings
# come from OTA_* environment variables, or from /data/config.yaml when present. The management API
# and console listen on 127.0.0.1:8080 inside the container (enough for the health check and for
# `docker exec ota-broker ota-broker ...`); add -e OTA_ADMIN_BIND=0.0.0.0:8080 -p 127.0.0.1:8080:8080
# to reach them from the host. docs/deploy.md has the rest.

FROM python:3.11-slim-bookworm AS build
# PyInstaller needs objdump and objcopy.
RUN apt-get update \
    && apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN scripts/build-binary

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 ota \
    && useradd --system --uid 10001 --gid ota --home-dir /data --no-create-home --shell /usr/sbin/nologin ota \
    && mkdir /data \
    && chown ota:ota /data \
    && chmod 0750 /data
COPY --from=build /src/dist/ota-broker /usr/local/bin/ota-broker
ENV OTA_DATA_DIR=/data
WORKDIR /data
VOLUME ["/data"]
USER 10001:10001
EXPOSE 1883 8883 8443 8080
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/ota-broker", "health"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/ota-broker"]
CMD ["run"]
