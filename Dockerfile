# The production image: the three binaries, the shipped weights (the
# classifier and the face detector, whose Apache-2.0 licence ships beside
# it) and the sample faces, run as a non-root user.
#
#   docker build -t profile-classifier .                # public base images
#
# Air-gapped (no registry; see "Running a fleet" in the README): point the
# base images at local ones and package binaries built on the host instead
# of compiling in a Rust image,
#
#   cargo build --release --locked --bins
#   podman build --target prebuilt --build-arg RUN_IMAGE=localhost/debian:bookworm \
#       -t profile-classifier .
#
# The `prebuilt` target copies target/release/profile-{worker,trainer,loadgen}
# (built for the same Debian release as RUN_IMAGE; .dockerignore lets only
# those three files of target/ into the context).
#
# GPU image (not run on the project's machines):
#   docker build -t profile-classifier:cuda --build-arg CUDA=1 \
#     --build-arg BUILD_IMAGE=<a CUDA *devel* image with Rust installed> \
#     --build-arg RUN_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 .
# then run the worker with `--device cuda`.
ARG BUILD_IMAGE=rust:1-bookworm
ARG RUN_IMAGE=debian:bookworm-slim

# What every variant of the image holds besides the binaries.
FROM ${RUN_IMAGE} AS runtime
RUN useradd --system --uid 10001 --no-create-home profile
COPY weights /opt/profile/weights
COPY tests/fixtures/faces /opt/profile/samples
WORKDIR /opt/profile
ENV PROFILE_WEIGHTS=/opt/profile/weights/gender-cnn.safetensors \
    PROFILE_DETECTOR=/opt/profile/weights/blazeface-front.safetensors
EXPOSE 9464
ENTRYPOINT ["profile-worker"]

# Binaries built outside the image (the air-gapped CI path).
FROM runtime AS prebuilt
COPY target/release/profile-worker target/release/profile-trainer target/release/profile-loadgen /usr/local/bin/
USER profile

# Compiling in the image; the registry and the target directory are cache
# mounts, so dependencies are downloaded and compiled once across builds.
FROM ${BUILD_IMAGE} AS build
ARG CUDA=0
# libjpeg-turbo (the turbojpeg crate) is compiled with cmake, its SIMD code with nasm.
RUN apt-get update && apt-get install -y --no-install-recommends cmake nasm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY vendor ./vendor
COPY src ./src
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    if [ "$CUDA" = "1" ]; then FEATURES="--features cuda"; else FEATURES=""; fi \
 && cargo build --release --locked --bins $FEATURES \
 && mkdir -p /out \
 && cp target/release/profile-worker target/release/profile-trainer target/release/profile-loadgen /out/

# The default target: compiled in the build stage.
FROM runtime
COPY --from=build /out/ /usr/local/bin/
USER profile
