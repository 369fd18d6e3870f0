# The ccgate gateway (for docker-compose.yml). Session containers use container/Dockerfile.
FROM python:3.11-slim
# iptables: the sessions firewall (the gateway runs in the host's network namespace);
# git and openssh-client: registered repositories and git-URL jobs.
RUN apt-get update && apt-get install -y --no-install-recommends iptables git openssh-client \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY gateway ./gateway
COPY wrapper ./wrapper
RUN pip install --no-cache-dir . && useradd --system --uid 10001 ccgate
ENV CCGATE_HOST=0.0.0.0 CCGATE_DATA_DIR=/var/lib/ccgate
EXPOSE 8000
CMD ["ccgate", "serve"]
