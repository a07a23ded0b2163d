#!/usr/bin/env bash
# `make demo`: start the local stack, build chbridge, create a table, produce
# sample events, run chbridge in the background and show the rows arriving.
# `scripts/demo.sh stop` stops the demo bridge.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
STACK_DIR=${STACK_DIR:-$REPO/.stack}
VENV=${VENV:-$REPO/.venv}
CH_HTTP_PORT=${CH_HTTP_PORT:-8123}
KAFKA_PORT=${KAFKA_PORT:-9092}
PIDFILE=$STACK_DIR/demo-bridge.pid
LOG=$STACK_DIR/demo-bridge.log
CONFIG=$STACK_DIR/demo.toml
COUNT=${DEMO_EVENTS:-5000}

ch() { curl -sS --fail-with-body "http://127.0.0.1:$CH_HTTP_PORT/" --data-binary "$1"; }

stop_bridge() {
    if [[ -f $PIDFILE ]] && kill -0 "$(<"$PIDFILE")" 2>/dev/null; then
        kill -TERM "$(<"$PIDFILE")"
        for _ in $(seq 1 100); do kill -0 "$(<"$PIDFILE")" 2>/dev/null || break; sleep 0.2; done
        echo "demo bridge stopped (log: $LOG)"
    fi
    rm -f "$PIDFILE"
}

if [[ ${1:-} == stop ]]; then stop_bridge; exit 0; fi

echo "==> starting ClickHouse and the Kafka broker on 127.0.0.1"
"$REPO/scripts/stack.sh" start

echo "==> building chbridge (release)"
(cd "$REPO" && cargo build --release --quiet)
BIN=$REPO/target/release/chbridge

echo "==> creating table default.demo_events"
ch "$(cat "$REPO/scripts/demo.sql")"

echo "==> producing $COUNT sample events (and 3 malformed ones) to topic demo_events"
"$VENV/bin/python" "$REPO/scripts/produce.py" --brokers "127.0.0.1:$KAFKA_PORT" \
    --topic demo_events --count "$COUNT" --bad 3

sed -e "s/127.0.0.1:9092/127.0.0.1:$KAFKA_PORT/" -e "s/127.0.0.1:8123/127.0.0.1:$CH_HTTP_PORT/" \
    "$REPO/config/example.toml" > "$CONFIG"
"$BIN" check --config "$CONFIG"

echo "==> running chbridge (log: $LOG)"
stop_bridge
before=$(ch "SELECT count() FROM default.demo_events")
setsid nohup "$BIN" run --config "$CONFIG" >"$LOG" 2>&1 < /dev/null &
echo $! > "$PIDFILE"

want=$((before + COUNT))
for _ in $(seq 1 150); do
    n=$(ch "SELECT count() FROM default.demo_events")
    echo "    rows in default.demo_events: $n"
    [[ $n -ge $want ]] && break
    kill -0 "$(<"$PIDFILE")" 2>/dev/null || { echo "chbridge exited; log:"; tail -n 30 "$LOG"; exit 1; }
    sleep 0.4
done
[[ $n -ge $want ]] || { echo "rows did not all arrive; log:"; tail -n 30 "$LOG"; exit 1; }

echo "==> SELECT event, count(), round(sum(amount), 2) FROM default.demo_events GROUP BY event"
ch "SELECT event, count() AS events, round(sum(amount), 2) AS amount FROM default.demo_events GROUP BY event ORDER BY event FORMAT PrettyCompactMonoBlock"
echo "==> the latest 5 rows"
ch "SELECT id, ts, user, event, amount, tags FROM default.demo_events ORDER BY ts DESC LIMIT 5 FORMAT PrettyCompactMonoBlock"
echo "==> what chbridge counted (http://127.0.0.1:9187/metrics)"
curl -s http://127.0.0.1:9187/metrics | grep -E '^chbridge_(records_consumed_total|records_failed_total|rows_inserted_total|committed_offset)' || true

cat <<MSG

chbridge is still running (pid $(<"$PIDFILE")): produce more with
  $VENV/bin/python scripts/produce.py --topic demo_events --count 1000
and query with
  curl 'http://127.0.0.1:$CH_HTTP_PORT/' --data-binary 'SELECT count() FROM default.demo_events'
Stop everything with: make demo-stop
MSG
