# syntax=docker/dockerfile:1
# The fleetgate image: one static-ish binary (glibc only; TLS is rustls, Protobuf is compiled
# with protox, so no OpenSSL or protoc) on distroless, as a non-root user, with nothing to
# write outside the volumes the chart mounts. Build: docker build -t fleetgate .

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Manifests and sources only (.dockerignore keeps target/ and results out of the context).
COPY . .
# The release profile keeps debug info for profiling (118 MB); the image drops it and keeps
# the symbol table, so panics still name their functions (18 MB).
RUN scripts/build-release \
    && mkdir -p /out \
    && objcopy --strip-debug target/release/fleetgate /out/fleetgate

# cc: glibc and libgcc, which a Rust binary links; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/fleetgate /usr/local/bin/fleetgate
# Inside a container the listeners must accept connections from other pods; outside one,
# the binary's defaults stay on loopback.
ENV FLEETGATE_LISTEN=0.0.0.0:8080 \
    FLEETGATE_ADMIN_LISTEN=0.0.0.0:8081 \
    FLEETGATE_INTERNAL_LISTEN=0.0.0.0:9090 \
    FLEETGATE_LOG_FORMAT=json
EXPOSE 8080 8081 9090
# 65532 is distroless's `nonroot`; numeric so `runAsNonRoot` can verify it.
USER 65532:65532
# SIGTERM starts the drain (sessions closed with 1012 over the drain period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/fleetgate"]
CMD ["all"]
