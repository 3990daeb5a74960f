# syntax=docker/dockerfile:1
# Postern's binaries in one small image: postern-proxy, postern-agent, postern-auth, pctl, psh.
#
#   docker build -t postern:0.1.0 .
#   docker run --rm postern:0.1.0 postern-proxy --help
#
# Build stage: the official Rust image on Debian, release profile, --locked (Cargo.lock as
# committed). BuildKit cache mounts keep the registry and target dir between builds.
# Runtime stage: Debian slim (the same Debian release as the builder, so the same glibc), with
# ca-certificates, a shell and coreutils (the Kubernetes manifests' init containers copy keys with
# `install`; see deploy/kubernetes/README.md), running as UID/GID 10001.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
# ring and the bundled SQLite build C with the image's gcc; protox compiles the .proto in pure
# Rust (no protoc).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p postern-proxy -p postern-agent -p postern-auth -p postern-cli --bins \
    && mkdir -p /out \
    && cp target/release/postern-proxy target/release/postern-agent target/release/postern-auth \
          target/release/pctl target/release/psh /out/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates unpinned on purpose: it should be the release's current one (trust store
# updates), like the base image's other security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 postern \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
               --shell /usr/sbin/nologin postern \
    && install -d -m 0700 -o 10001 -g 10001 \
               /var/lib/postern-proxy /var/lib/postern-agent /var/lib/postern-auth
COPY --from=build /out/ /usr/local/bin/
COPY deploy/docker/entrypoint.sh /usr/local/bin/postern-entrypoint
COPY deploy/proxy.toml deploy/agent.toml deploy/auth.toml /usr/share/doc/postern/examples/
# Numeric, so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /nonexistent
# web (HTTPS discovery), tunnel (SSH; its UDP twin for QUIC), ops (metrics and health), Auth API
EXPOSE 3080/tcp 3024/tcp 3024/udp 3081/tcp 3025/tcp
ENTRYPOINT ["/usr/local/bin/postern-entrypoint"]
CMD ["postern-proxy", "--help"]
