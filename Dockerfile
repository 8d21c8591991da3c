# syntax=docker/dockerfile:1.7
# One multi-stage build, one target per binary:
#   docker build --target controller -t <registry>/controller:<tag> .
#   docker build --target agent      -t <registry>/agent:<tag> .
#   docker build --target emulator   -t <registry>/emulator:<tag> .
#   docker build --target cli        -t <registry>/cli:<tag> .
# Reproducible: pinned base images and toolchain, Cargo.lock enforced, paths remapped, and
# SOURCE_DATE_EPOCH (e.g. the commit time) stamped into every layer by BuildKit.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
ARG SOURCE_DATE_EPOCH=0
ENV CARGO_INCREMENTAL=0 \
    CARGO_NET_RETRY=5 \
    RUSTFLAGS="--remap-path-prefix=/src=. --remap-path-prefix=/usr/local/cargo=cargo -C strip=symbols"
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
      -p pod-identity-controller -p pod-identity-agent -p pod-identity-emulator -p pod-identity-cli \
 && mkdir -p /out \
 && cp target/release/pod-identity-controller target/release/pod-identity-agent \
       target/release/pod-identity-emulator target/release/kubectl-podidentity /out/

# The controller needs nothing but its binary and CA certificates.
FROM gcr.io/distroless/cc-debian12:nonroot AS controller
COPY --from=build /out/pod-identity-controller /usr/local/bin/pod-identity-controller
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/pod-identity-controller"]

# The agent manages iptables rules and conntrack entries in the node's network namespace, which takes
# root with NET_ADMIN and NET_RAW; the chart drops every other capability and mounts the root
# filesystem read-only. Its image holds the agent and what it runs, nothing else: iptables (both
# backends, so that it can use the node's, with the extensions every listed rule may load), conntrack,
# the libraries they load and the CA bundle; no shell, no package manager. tools/images/rootfs.sh picks
# the files, for this image and for the images the tests pack.
FROM debian:${DEBIAN_RELEASE}-slim AS agent-rootfs
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables conntrack ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY tools/images/rootfs.sh /usr/local/bin/rootfs.sh
COPY --from=build /out/pod-identity-agent /tmp/pod-identity-agent
RUN sh /usr/local/bin/rootfs.sh agent /rootfs /tmp/pod-identity-agent

FROM scratch AS agent
COPY --from=agent-rootfs /rootfs/ /
ENTRYPOINT ["/usr/local/bin/pod-identity-agent"]

FROM gcr.io/distroless/cc-debian12:nonroot AS emulator
COPY --from=build /out/pod-identity-emulator /usr/local/bin/pod-identity-emulator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/pod-identity-emulator"]

FROM gcr.io/distroless/cc-debian12:nonroot AS cli
COPY --from=build /out/kubectl-podidentity /usr/local/bin/kubectl-podidentity
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kubectl-podidentity"]
