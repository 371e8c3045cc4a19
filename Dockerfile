# syntax=docker/dockerfile:1
# Multi-stage build of the five binaries (streamer, collector, gateway, exporter, admin) into one small
# runtime image. Choose the binary with the container command, e.g. `telemetry-gateway`.
#
#   docker build -t gpu-telemetry .
#   docker run --rm -e ETCD_ENDPOINTS=etcd:2379 -p 8080:8080 gpu-telemetry telemetry-gateway
#
# For machines that reach a container registry (it pulls rust and debian-slim) and for
# deploy/compose.yaml, whose gateway health check runs curl inside the container. Without a
# registry, scripts/image builds the same binaries into a FROM-scratch image (no shell, no curl)
# from this machine's toolchain; both run as user 10001 with the sample under /data.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        --bin telemetry-streamer --bin telemetry-collector \
        --bin telemetry-gateway --bin telemetry-exporter --bin telemetry-admin \
    && mkdir -p /out \
    && cp target/release/telemetry-streamer target/release/telemetry-collector \
          target/release/telemetry-gateway target/release/telemetry-exporter \
          target/release/telemetry-admin /out/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin telemetry
COPY --from=build /out/ /usr/local/bin/
COPY data/dcgm_sample.csv /data/dcgm_sample.csv
USER 10001
ENV RUST_LOG=info
EXPOSE 8080 9100
CMD ["telemetry-gateway"]
