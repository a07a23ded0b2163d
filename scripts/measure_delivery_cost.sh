#!/usr/bin/env bash
# Measures what exactly-once costs against at-least-once: the same N narrow
# JSON records (the demo's events, 4 partitions) moved by the release build
# into two identical MergeTree tables, one run per mode, on the local stack.
# Prints rows/s (from the first row landing to the last, so the group join is
# excluded), the bridge's CPU seconds per million rows, its inserts, and the ratios.
# Usage: scripts/measure_delivery_cost.sh [N]   (default 2000000; needs `make release`)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
N=${1:-2000000}
BIN=$REPO/target/release/chbridge
CH=http://127.0.0.1:${CH_HTTP_PORT:-8123}/
BROKERS=127.0.0.1:${KAFKA_PORT:-9092}
PY=${VENV:-$REPO/.venv}/bin/python
[[ -x $BIN ]] || { echo "build it first: make release" >&2; exit 1; }
"$REPO/scripts/stack.sh" start >/dev/null
q() { curl -sS --fail-with-body "$CH" --data-binary "$1"; }
RUN=cost_$(date +%s)
TMP=$(mktemp -d)
cleanup() {
    [[ -n ${PID:-} ]] && kill -9 "$PID" 2>/dev/null || true
    for m in alo eos; do q "DROP TABLE IF EXISTS default.${RUN}_$m" >/dev/null || true; done
    q "DROP TABLE IF EXISTS default.${RUN}_state" >/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
"$PY" "$REPO/scripts/produce.py" --brokers "$BROKERS" --topic "$RUN" --count "$N" --partitions 4 --seed 7 >/dev/null
TABLE="(id UInt64, ts DateTime64(3, 'UTC'), user LowCardinality(String), event LowCardinality(String), amount Float64, tags Array(String)) ENGINE = MergeTree ORDER BY (event, ts)"
q "CREATE TABLE default.${RUN}_alo $TABLE"
q "CREATE TABLE default.${RUN}_eos $TABLE SETTINGS non_replicated_deduplication_window = 1000"

ticks=$(getconf CLK_TCK)
printf '%-14s %10s %12s %10s %10s\n' mode rows/s cpu_s/M inserts peak_rss_MiB
for mode in alo eos; do
    delivery=at-least-once; [[ $mode == eos ]] && delivery=exactly-once
    PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    cat > "$TMP/$mode.toml" <<TOML
delivery = "$delivery"
[exactly_once]
state_table = "${RUN}_state"
[kafka]
brokers = "$BROKERS"
group_id = "${RUN}_$mode"
[kafka.properties]
"session.timeout.ms" = "2000"
"heartbeat.interval.ms" = "600"
[clickhouse]
url = "$CH"
[batch]
# The last, partial batch of each mode waits max_wait before it is sent; with
# one batch per partition in exactly-once mode, a long wait would measure the
# tail rather than the modes. Both modes get the same short wait.
max_wait = "100ms"
[http]
listen = "127.0.0.1:$PORT"
[log]
level = "warn"
[[routes]]
topics = ["$RUN"]
table = "${RUN}_$mode"
TOML
    "$BIN" run --config "$TMP/$mode.toml" 2>"$TMP/$mode.log" &
    PID=$!
    first=""
    while :; do
        c=$(q "SELECT count() FROM default.${RUN}_$mode")
        now=$(date +%s.%N)
        [[ -z $first && $c -gt 0 ]] && { first=$now; first_rows=$c; }
        [[ $c -ge $N ]] && break
        kill -0 "$PID" 2>/dev/null || { echo "bridge exited; log:" >&2; cat "$TMP/$mode.log" >&2; exit 1; }
        sleep 0.05
    done
    read -r ut st <<<"$(awk '{print $14, $15}' "/proc/$PID/stat")"
    rss=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$PID/status")
    inserts=$(curl -s "http://127.0.0.1:$PORT/metrics" | awk '/^chbridge_batches_inserted_total/ {s += $2} END {print s + 0}')
    kill -TERM "$PID"; wait "$PID" || true; PID=""
    rate=$(awk -v n="$N" -v r="$first_rows" -v a="$first" -v b="$now" 'BEGIN {printf "%d", (n - r) / (b - a)}')
    cpu=$(awk -v u="$ut" -v s="$st" -v t="$ticks" -v n="$N" 'BEGIN {printf "%.2f", (u + s) / t / (n / 1e6)}')
    printf '%-14s %10s %12s %10s %10s\n' "$delivery" "$rate" "$cpu" "$inserts" "$rss"
    eval "rate_$mode=$rate cpu_$mode=$cpu"
done
awk -v a="$rate_alo" -v e="$rate_eos" -v ca="$cpu_alo" -v ce="$cpu_eos" \
    'BEGIN {printf "exactly-once / at-least-once: throughput %.2f, CPU per row %.2f\n", e / a, ce / ca}'
[[ $(q "SELECT count() FROM default.${RUN}_eos") == "$N" ]] || { echo "exactly-once table does not hold exactly $N rows" >&2; exit 1; }
