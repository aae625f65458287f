# The generation server. Built by docker-compose.yml; the database lives in the /data volume.
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p server --bin server

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/server /usr/local/bin/server
VOLUME /data
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/server"]
