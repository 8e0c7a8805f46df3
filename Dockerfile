# The herald binary in a small image. nats-server runs as its own container (docker-compose.yml).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin herald

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/herald /usr/local/bin/herald
ENV HERALD_HTTP_ADDR=0.0.0.0:8080 \
    HERALD_DATA_DIR=/tmp/herald \
    HERALD_LOG_FORMAT=json
USER 65534
EXPOSE 8080
ENTRYPOINT ["herald"]
CMD ["gateway"]
