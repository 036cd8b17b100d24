# nats-server from Debian's packages, for hosts that cannot pull `nats` from
# a registry (deploy/stack-test.sh, deploy/compose.local.yml).
ARG BASE=localhost/debian:bookworm
FROM ${BASE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nats-server \
 && rm -rf /var/lib/apt/lists/*
EXPOSE 4222 8222
ENTRYPOINT ["/usr/sbin/nats-server"]
