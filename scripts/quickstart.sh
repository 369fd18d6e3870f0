#!/usr/bin/env bash
# One command from a fresh Debian/Ubuntu machine to a real Claude Code session streaming in your
# terminal: sets everything up, starts Redis, the gateway (and the scripted model when
# ANTHROPIC_API_KEY is unset), creates a session, sends a prompt, streams the events and lists
# the file the CLI wrote as an artifact. The gateway keeps running afterwards:
#   scripts/quickstart.sh --stop    deletes the demo's sessions and stops what it started.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

data_dir=${CCGATE_DATA_DIR:-$HOME/.ccgate}
port=${CCGATE_PORT:-8000}
redis_port=${CCGATE_QUICKSTART_REDIS_PORT:-6380}
model_port=${CCGATE_QUICKSTART_MODEL_PORT:-18765}
pids="$data_dir/quickstart.pids"
mkdir -p "$data_dir"

if [ "${1:-}" = "--stop" ]; then
  # Delete the demo's sessions (containers, volumes) while the gateway still runs.
  if [ -f "$data_dir/quickstart.token" ] && curl -sf "http://127.0.0.1:$port/health" >/dev/null; then
    auth="Authorization: Bearer $(cat "$data_dir/quickstart.token")"
    curl -sf -H "$auth" "http://127.0.0.1:$port/api/v1/sessions?limit=500" \
      | python3 -c 'import json,sys; [print(s["session_id"]) for s in json.load(sys.stdin)["sessions"] if not s["parent_session_id"]]' \
      | while read -r sid; do curl -sf -o /dev/null -X DELETE -H "$auth" "http://127.0.0.1:$port/api/v1/sessions/$sid"; done
  fi
  [ -f "$pids" ] && while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$pids"
  redis-cli -p "$redis_port" -a "$(cat "$data_dir/redis-password" 2>/dev/null)" --no-auth-warning shutdown nosave 2>/dev/null || true
  rm -f "$pids"; echo "stopped"; exit 0
fi

bash scripts/setup.sh

# Redis for the gateway and the session containers (they reach it via host.docker.internal).
[ -f "$data_dir/redis-password" ] || (umask 077; head -c 24 /dev/urandom | base64 | tr -d '/+=' > "$data_dir/redis-password")
redis_pw=$(cat "$data_dir/redis-password")
if ! redis-cli -p "$redis_port" -a "$redis_pw" --no-auth-warning ping >/dev/null 2>&1; then
  redis-server --port "$redis_port" --bind 0.0.0.0 --protected-mode no --requirepass "$redis_pw" \
    --daemonize yes --dir "$data_dir" --logfile "$data_dir/redis.log"
  for _ in $(seq 1 50); do redis-cli -p "$redis_port" -a "$redis_pw" --no-auth-warning ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

export CCGATE_DATA_DIR="$data_dir" CCGATE_PORT="$port"
export CCGATE_REDIS_URL="redis://:$redis_pw@127.0.0.1:$redis_port/0"
if [ -n "${ANTHROPIC_API_KEY:-}" ]; then
  export CCGATE_ANTHROPIC_API_KEY="$ANTHROPIC_API_KEY"
  prompt="Create a file named hello.txt in the current directory containing the line 'Hello from ccgate', then reply with one short sentence."
  echo "quickstart: using the real Anthropic API (ANTHROPIC_API_KEY is set)"
else
  if ! curl -sf "http://127.0.0.1:$model_port/v1/models" >/dev/null; then
    nohup .venv/bin/ccgate scripted-model --host 0.0.0.0 --port "$model_port" > "$data_dir/scripted-model.log" 2>&1 &
    echo $! >> "$pids"
  fi
  export CCGATE_ANTHROPIC_BASE_URL="http://127.0.0.1:$model_port"
  export CCGATE_ANTHROPIC_API_KEY="sk-ant-scripted-model"
  prompt="write hello.txt Hello from ccgate"
  echo "quickstart: no ANTHROPIC_API_KEY, using the scripted model server"
fi

if ! curl -sf "http://127.0.0.1:$port/health" >/dev/null; then
  nohup .venv/bin/ccgate serve --host 0.0.0.0 --port "$port" > "$data_dir/gateway.log" 2>&1 &
  echo $! >> "$pids"
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
fi
curl -sf "http://127.0.0.1:$port/health" >/dev/null \
  || { echo "quickstart: gateway is not healthy:"; curl -s "http://127.0.0.1:$port/health"; tail -20 "$data_dir/gateway.log"; exit 1; }

token=$(.venv/bin/ccgate token quickstart)
echo "$token" > "$data_dir/quickstart.token"
echo "quickstart: gateway on http://127.0.0.1:$port (token in $data_dir/quickstart.token)"
echo
CCGATE_TOKEN="$token" .venv/bin/ccgate chat --url "http://127.0.0.1:$port" "$prompt"
echo
echo "quickstart: done. Try:  CCGATE_TOKEN=\$(cat $data_dir/quickstart.token) .venv/bin/ccgate chat --url http://127.0.0.1:$port \"braces\""
echo "quickstart: stop everything with: scripts/quickstart.sh --stop"
