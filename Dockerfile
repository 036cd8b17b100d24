# Multi-stage build of the three binaries plus the shipped weights (the
# classifier and the face detector, whose Apache-2.0 licence ships beside it).
#
#   docker build -t profile-classifier .
#
# GPU image (untested here: no Docker engine or GPU on the test machines):
#   docker build -t profile-classifier:cuda \
#     --build-arg CUDA=1 \
#     --build-arg BUILD_IMAGE=<a CUDA *devel* image with Rust installed> \
#     --build-arg RUN_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 .
# then run the worker with `--device cuda`.
ARG BUILD_IMAGE=rust:1-bookworm
ARG RUN_IMAGE=debian:bookworm-slim

FROM ${BUILD_IMAGE} AS build
ARG CUDA=0
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN if [ "$CUDA" = "1" ]; then FEATURES="--features cuda"; else FEATURES=""; fi \
 && cargo build --release --locked --bins $FEATURES

FROM ${RUN_IMAGE}
RUN useradd --system --uid 10001 --no-create-home profile
COPY --from=build /src/target/release/profile-worker /src/target/release/profile-trainer /src/target/release/profile-loadgen /usr/local/bin/
COPY weights /opt/profile/weights
COPY tests/fixtures/faces /opt/profile/samples
WORKDIR /opt/profile
USER profile
ENV PROFILE_WEIGHTS=/opt/profile/weights/gender-cnn.safetensors \
    PROFILE_DETECTOR=/opt/profile/weights/blazeface-front.safetensors
EXPOSE 9464
ENTRYPOINT ["profile-worker"]
