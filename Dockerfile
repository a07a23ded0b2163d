# syntax=docker/dockerfile:1
#
# chbridge image: built with the Rust toolchain, run on distroless (glibc, no shell,
# no package manager) as uid 65532. The process writes no files, so the container
# runs with a read-only root filesystem (`docker run --read-only`, Kubernetes
# `readOnlyRootFilesystem: true`) and needs no volume besides its configuration.
#
#   docker build -t chbridge .
#   docker run --read-only -p 9187:9187 \
#     -v "$PWD/chbridge.toml:/etc/chbridge/chbridge.toml:ro" \
#     -e CHBRIDGE_CLICKHOUSE_PASSWORD=... chbridge
#
# The configuration is not baked in: mount it at /etc/chbridge/chbridge.toml with
# `http.listen = "0.0.0.0:9187"`, or pass other arguments (`check --config ...`).

FROM rust:1-bookworm AS build
# The image already has what the bundled librdkafka and vendored OpenSSL need
# (gcc, g++, make, perl, pkg-config).
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Build zlib into the binary instead of linking the system libz.so.1, which the
# runtime image (distroless/cc) does not have.
ENV LIBZ_SYS_STATIC=1 \
    CARGO_TERM_COLOR=never
WORKDIR /src
COPY . .
# The registry and target caches survive between builds (BuildKit), so a source
# change recompiles chbridge only, not librdkafka and OpenSSL. target/ is a cache
# mount, hence the copy out of it in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin chbridge \
    && install -D -m 0755 target/release/chbridge /out/chbridge
# Fail here, not at start-up, if the binary needs a shared library other than
# glibc, libgcc_s and libstdc++ (the ones distroless/cc guarantees).
RUN missing=$(ldd /out/chbridge | grep -vE 'linux-vdso|ld-linux|/lib(c|m|dl|pthread|rt|gcc_s|stdc\+\+)\.so' || true); \
    if [ -n "$missing" ]; then echo "chbridge needs shared libraries the runtime image may lack:"; echo "$missing"; exit 1; fi

# cc: glibc plus libgcc_s, which Rust binaries link dynamically. :nonroot runs as 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
# For a release: --build-arg VERSION=... --build-arg REVISION=$(git rev-parse HEAD)
# --build-arg CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
ARG VERSION=unknown
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="chbridge" \
      org.opencontainers.image.description="Kafka-to-ClickHouse consumer bridge that never loses a row" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/chbridge/chbridge" \
      org.opencontainers.image.url="https://github.com/chbridge/chbridge" \
      org.opencontainers.image.documentation="https://github.com/chbridge/chbridge/blob/main/docs/configuration.md" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=build /out/chbridge /usr/local/bin/chbridge
# Numeric, so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 65532:65532
# /metrics, /healthz, /readyz (http.listen must be 0.0.0.0:9187 in a container).
EXPOSE 9187
# SIGTERM starts the drain (flush, commit, leave the group) within shutdown_timeout
# (30s by default): give the container longer than that to stop (docker stop -t 45).
STOPSIGNAL SIGTERM
# No shell or curl in distroless: the binary probes its own /healthz (liveness).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/chbridge", "healthcheck", "--url", "http://127.0.0.1:9187/healthz"]
ENTRYPOINT ["/usr/local/bin/chbridge"]
CMD ["run", "--config", "/etc/chbridge/chbridge.toml"]
