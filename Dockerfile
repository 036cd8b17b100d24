# Multi-stage build of the three binaries plus the shipped weights.
#   docker build -t profile-classifier .
# CUDA builds need a CUDA base image and toolkit; see the README (not tested here).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home profile
COPY --from=build /src/target/release/profile-worker /src/target/release/profile-trainer /src/target/release/profile-loadgen /usr/local/bin/
COPY weights /opt/profile/weights
COPY tests/fixtures/faces /opt/profile/samples
WORKDIR /opt/profile
USER profile
ENV PROFILE_WEIGHTS=/opt/profile/weights/gender-cnn.safetensors
EXPOSE 9464
ENTRYPOINT ["profile-worker"]
