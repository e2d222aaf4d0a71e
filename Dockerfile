# syntax=docker/dockerfile:1
# Floodgate's image: one static-enough binary on distroless, run as a non-root user, made
# for a read-only root filesystem (everything it writes is under the VOLUME).
#
#   docker build -t floodgate .
#   docker run --read-only -p 8080:8080 -v fgdata:/var/lib/floodgate floodgate \
#     serve --listen 0.0.0.0:8080 --insecure-no-auth      # or a --config with [ingest.auth]
#
# The ECS task definitions (deploy/cloudformation/floodgate.yaml) run `ingest` and `process`
# with /busybox/sh, which only the debug variant of distroless has, to write their
# configuration from the environment into the volume. scripts/check-deploy runs hadolint here.

# ---- build: the workspace's toolchain (Cargo.toml rust-version 1.95). Every C dependency
# (aws-lc-sys through its cc builder, ring, zstd-sys, libsqlite3-sys bundled, mimalloc)
# builds with the image's gcc; no cmake, clang or OpenSSL needed.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin floodgate \
 && install -D -m 0755 target/release/floodgate /out/usr/local/bin/floodgate \
 && install -d -m 0700 /out/var/lib/floodgate

# ---- run: glibc, libgcc, CA certificates (the AWS SDK reads the system's roots), no
# package manager; busybox at /busybox for the tasks' one-line start scripts.
FROM gcr.io/distroless/cc-debian12:debug-nonroot
COPY --from=build /out/usr/local/bin/floodgate /usr/local/bin/floodgate
# The data directory, owned by the image's user (65532) so that a fresh volume, which
# takes the ownership of this directory, is writable with a read-only root.
COPY --from=build --chown=65532:65532 /out/var/lib/floodgate /var/lib/floodgate
USER 65532:65532
ENV FLOODGATE_DATA_DIR=/var/lib/floodgate
# serve and ingest also answer /metrics, /healthz and /readyz on 9092, apart from clients,
# so that the health check answers while the edge is at its connection limit.
ENV FLOODGATE_OPS_LISTEN=127.0.0.1:9092
VOLUME ["/var/lib/floodgate"]
# 8080: the edge (serve, ingest); 9091: the workers' /metrics, /healthz, /readyz (process --listen).
EXPOSE 8080 9091
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/floodgate", "healthcheck", "--url", "http://127.0.0.1:9092/healthz"]
ENTRYPOINT ["/usr/local/bin/floodgate"]
CMD ["serve", "--listen", "0.0.0.0:8080"]
