# Minimal image: build with the Rust toolchain, run on a slim Debian as non-root.
# (A hardened image with labels and a healthcheck comes with the deployment issue.)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked && cp target/release/chbridge /chbridge

FROM debian:bookworm-slim
COPY --from=build /chbridge /usr/local/bin/chbridge
USER 65532:65532
EXPOSE 9187
ENTRYPOINT ["/usr/local/bin/chbridge"]
