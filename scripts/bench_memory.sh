#!/usr/bin/env bash
# Memory bound under a backlog: ClickHouse is stopped while N records (default
# 5,000,000) wait in the topic. The bridge (release build, default settings)
# must fill its buffer up to max_buffered_bytes, pause, and stay there: prints
# its peak RSS against the budget, then restarts ClickHouse and checks that
# every record lands. Runs a private ClickHouse (own data dir and ports) and
# uses the local broker. Usage: scripts/bench_memory.sh [N]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
N=${1:-5000000}
BIN=$REPO/target/release/chbridge
PY=${VENV:-$REPO/.venv}/bin/python
BROKERS=127.0.0.1:${KAFKA_PORT:-9092}
[[ -x $BIN ]] || { echo "build it first: make release" >&2; exit 1; }
"$REPO/scripts/stack.sh" start >/dev/null
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
DIR=$REPO/target/bench/memory
rm -rf "$DIR"; mkdir -p "$DIR/ch/data"
CH_PORT=$(free_port); TCP_PORT=$(free_port); HTTP_PORT=$(free_port)
CH=http://127.0.0.1:$CH_PORT/
start_ch() {
    "$PY" "$REPO/scripts/clickhouse_server.py" "$DIR/ch/data" "$CH_PORT" "$TCP_PORT" >/dev/null 2>>"$DIR/ch.log" &
    CH_PID=$!
    for _ in $(seq 300); do curl -sf "$CH" --data-binary 'SELECT 1' >/dev/null 2>&1 && return; sleep 0.2; done
    echo "private ClickHouse did not start; see $DIR/ch.log" >&2; exit 1
}
cleanup() { kill -9 "${BRIDGE:-}" "${CH_PID:-}" 2>/dev/null || true; }
trap cleanup EXIT
q() { curl -sS --fail-with-body "$CH" --data-binary "$1"; }
TOPIC=membench_$(date +%s)
start_ch
q "CREATE TABLE default.events (id UInt64, ts DateTime64(3, 'UTC'), user LowCardinality(String), event LowCardinality(String), amount Float64, tags Array(String)) ENGINE = MergeTree ORDER BY (event, ts)"
echo "producing $N records to $TOPIC..."
"$PY" "$REPO/scripts/produce.py" --brokers "$BROKERS" --topic "$TOPIC" --count "$N" --partitions 4 --seed 3 >/dev/null
cat > "$DIR/chbridge.toml" <<TOML
[kafka]
brokers = "$BROKERS"
group_id = "$TOPIC"
[kafka.properties]
"session.timeout.ms" = "2000"
"heartbeat.interval.ms" = "600"
[clickhouse]
url = "$CH"
[http]
listen = "127.0.0.1:$HTTP_PORT"
[log]
level = "warn"
[[routes]]
topics = ["$TOPIC"]
table = "events"
TOML
budget=64   # MiB: the default max_buffered_bytes
metric() { curl -s "http://127.0.0.1:$HTTP_PORT/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
consumed() { curl -s "http://127.0.0.1:$HTTP_PORT/metrics" | awk '/^chbridge_records_consumed_total/ {s += $2} END {print s + 0}'; }
# ClickHouse goes away as soon as the bridge starts consuming: nearly the
# whole backlog then has nowhere to go.
"$BIN" run --config "$DIR/chbridge.toml" 2>"$DIR/bridge.log" &
BRIDGE=$!
for _ in $(seq 600); do [[ $(consumed) -gt 0 ]] && break; sleep 0.05; done
kill -9 "$CH_PID"; wait "$CH_PID" 2>/dev/null || true
echo "ClickHouse stopped; watching the bridge for 60 s"
for s in $(seq 60); do
    sleep 1
    kill -0 "$BRIDGE" 2>/dev/null || { echo "bridge exited; see $DIR/bridge.log" >&2; exit 1; }
    (( s % 10 == 0 )) && echo "  ${s}s: rss $(awk '/VmRSS/ {print int($2/1024)}' /proc/$BRIDGE/status) MiB, buffered $(metric chbridge_buffered_bytes) B, paused $(metric chbridge_consumer_paused), consumed $(consumed)"
done
peak=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$BRIDGE/status")
echo "memory: peak RSS ${peak} MiB with ClickHouse down and a backlog of $N records; budget ${budget} MiB (max_buffered_bytes), limit budget + 64 = $((budget + 64)) MiB"
start_ch
echo "ClickHouse back; waiting for all $N rows"
for _ in $(seq 600); do
    c=$(q "SELECT count() FROM default.events" 2>/dev/null || echo 0)
    [[ $c -ge $N ]] && break
    sleep 1
done
peak_after=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$BRIDGE/status")
echo "memory: $c of $N rows landed; peak RSS over the whole run ${peak_after} MiB"
(( peak <= budget + 64 )) && [[ $c == "$N" ]]
