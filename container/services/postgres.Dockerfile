# PostgreSQL 15 for the test suite (testcontainers), from the same registry-free Debian base as
# the session image: a cluster initialised at build time, trust auth, no fsync (throwaway data).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/*
USER postgres
RUN /usr/lib/postgresql/15/bin/initdb -D /var/lib/postgresql/data -U postgres \
      --auth=trust -E UTF8 >/dev/null \
 && echo "host all all 0.0.0.0/0 trust" >> /var/lib/postgresql/data/pg_hba.conf
EXPOSE 5432
ENTRYPOINT ["/usr/lib/postgresql/15/bin/postgres", "-D", "/var/lib/postgresql/data", \
            "-c", "listen_addresses=*", "-c", "fsync=off", "-c", "max_connections=300", \
            "-k", "/tmp"]
