# syntax=docker/dockerfile:1.7
#
# The berth image, for linux/amd64 and linux/arm64:
#   berth-agent, berth-shim   built here with cargo for $TARGETARCH (cross-compiled
#                             on the build platform: no emulation)
#   buildkitd, buildctl,      taken from the official rootless BuildKit image,
#   buildkit-runc             pinned by BUILDKIT_VERSION (static binaries)
#
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     -t "$REGISTRY/berth:0.1.0" --push .

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie
ARG BUILDKIT_VERSION=v0.32.2

# buildkitd, buildctl and buildkit-runc for the target platform.
FROM moby/buildkit:${BUILDKIT_VERSION}-rootless AS buildkit

# Rust on the build platform, cross-compiling for the target.
FROM --platform=$BUILDPLATFORM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
ARG TARGETARCH
ARG BUILDARCH
# The C toolchain of each target (ring and the libc crate link against glibc):
# Debian's gcc names these for the native arch too, so one setting fits all.
ENV CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER=x86_64-linux-gnu-gcc \
    CC_x86_64_unknown_linux_gnu=x86_64-linux-gnu-gcc \
    AR_x86_64_unknown_linux_gnu=x86_64-linux-gnu-ar \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
    CARGO_TERM_COLOR=never
RUN set -eux; \
    case "$TARGETARCH" in \
      amd64) triple=x86_64-unknown-linux-gnu;  gcc=gcc-x86-64-linux-gnu; libc=libc6-dev-amd64-cross ;; \
      arm64) triple=aarch64-unknown-linux-gnu; gcc=gcc-aarch64-linux-gnu; libc=libc6-dev-arm64-cross ;; \
      *) echo "unsupported TARGETARCH=$TARGETARCH (use linux/amd64 or linux/arm64)" >&2; exit 1 ;; \
    esac; \
    if [ "$TARGETARCH" != "$BUILDARCH" ]; then \
      apt-get update; \
      apt-get install -y --no-install-recommends "$gcc" "$libc"; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    rustup target add "$triple"; \
    echo "$triple" > /rust-target
WORKDIR /src
COPY . .
# Registry and target dir are caches (one target dir per arch); the binaries are
# copied out in the same step, since cache mounts are not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry,id=berth-cargo-registry \
    --mount=type=cache,target=/usr/local/cargo/git,id=berth-cargo-git \
    --mount=type=cache,target=/src/target,id=berth-target-${TARGETARCH},sharing=locked \
    set -eux; \
    triple="$(cat /rust-target)"; \
    cargo build --release --locked --target "$triple" -p berth-agent -p berth-shim --bins; \
    mkdir -p /out; \
    cp "target/$triple/release/berth-agent" "target/$triple/release/berth-shim" /out/

# The runtime: glibc (agent, shim), CA certificates (registry TLS of buildkitd),
# git and ssh (git build contexts), pigz and xz (layer compression), e2fsprogs
# (mkfs.ext4: each build's disk is an ext4 image on a loop device).
FROM debian:${DEBIAN_RELEASE}-slim
ARG DEBIAN_RELEASE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG BUILDKIT_VERSION
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates e2fsprogs git openssh-client pigz xz-utils; \
    rm -rf /var/lib/apt/lists/*
COPY --link --from=buildkit /usr/bin/buildkitd /usr/bin/buildctl /usr/bin/buildkit-runc /usr/bin/
COPY --link --from=build /out/berth-agent /out/berth-shim /usr/local/bin/
LABEL org.opencontainers.image.title="berth" \
      org.opencontainers.image.description="One fresh, rootless, resource-limited BuildKit daemon per CI build: node agent, shim and BuildKit ${BUILDKIT_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="debian:${DEBIAN_RELEASE}-slim" \
      dev.berth.buildkit.version="${BUILDKIT_VERSION}"
# Root and privileged: the agent creates the namespaces, id maps, mounts and
# cgroups of each build; each buildkitd itself runs rootless in its user namespace.
USER 0:0
ENTRYPOINT ["/usr/local/bin/berth-agent"]
CMD ["run"]
