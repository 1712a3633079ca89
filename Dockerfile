# multiclip in a container: built with the Rust toolchain, run from a slim Debian with the binary
# alone. Weights, data, caches and checkpoints are mounted, never baked in:
#
#   docker build -t multiclip:latest .
#   docker run --rm -p 8080:8080 -v "$PWD/models:/work/models:ro" \
#       -v "$PWD/checkpoints:/work/checkpoints:ro" multiclip:latest \
#       serve --checkpoint checkpoints/demo/NAME --addr 0.0.0.0:8080
#
# The working folder is /work, so the relative backbone locations a checkpoint records
# (models/dinov2-small, ...) resolve under /work (serve's --backbone-root defaults to it).

FROM docker.io/library/rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin multiclip

FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /work --create-home multiclip
COPY --from=build /src/target/release/multiclip /usr/local/bin/multiclip
USER multiclip
WORKDIR /work
EXPOSE 8080
ENTRYPOINT ["multiclip"]
CMD ["--help"]
