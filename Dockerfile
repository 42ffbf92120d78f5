# syntax=docker/dockerfile:1
# meshsign's container image: built with cargo in the official Rust image,
# run from a distroless image (glibc and CA certificates, no shell, no
# package manager) as an unprivileged user.
#
#   docker build -t meshsign:0.1.0 .
#
# The runtime image matches the builder's Debian release (glibc 2.36).
# jemalloc and aws-lc are compiled from C sources (the Rust image has cc and
# make); the proto is compiled by build.rs with protox (no protoc).
# Pin the images by digest (@sha256:...) for reproducible builds.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Only what the build reads (see .dockerignore). .cargo/config.toml sets
# --cfg tokio_unstable, as for a local build. The registry and target
# directories are cache mounts: a rebuild reuses downloads and compiled crates.
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo ./.cargo
COPY proto ./proto
COPY src ./src
# The release profile keeps line tables for backtraces (a 126 MB binary);
# the image drops them and keeps the symbols (27 MB; function names still in
# backtraces). --build-arg STRIP_DEBUG=false keeps everything.
ARG STRIP_DEBUG=true
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin meshsign \
    && install -m 0755 target/release/meshsign /usr/local/bin/meshsign \
    && if [ "$STRIP_DEBUG" = true ]; then strip --strip-debug /usr/local/bin/meshsign; fi

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/meshsign /usr/local/bin/meshsign
# distroless's nonroot user; the Helm chart runs it with the same IDs.
USER 65532:65532
# gRPC (CA service, health, reflection) and metrics/health.
EXPOSE 15012 15014
ENTRYPOINT ["/usr/local/bin/meshsign"]
CMD ["serve", "--config", "/etc/meshsign/config/meshsign.yaml"]
