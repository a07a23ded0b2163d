#!/usr/bin/env bash
# Measures how fast the local ClickHouse ingests 1M rows of a narrow event table in
# each insert format chbridge could send (the choice is explained in ARCHITECTURE.md).
# Prints rows/s and ClickHouse CPU seconds per million rows, three rounds each.
# Needs the local stack (scripts/stack.sh start).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
CH=http://127.0.0.1:${CH_HTTP_PORT:-8123}/
PID=$(cat "${STACK_DIR:-$REPO/.stack}/clickhouse.pid")
TMP=$(mktemp -d); trap 'rm -rf "$TMP"; curl -sS "$CH" --data-binary "DROP TABLE IF EXISTS default.fmt_t"' EXIT
q() { curl -sS --fail-with-body "$CH" --data-binary "$1"; }
q "CREATE OR REPLACE TABLE default.fmt_t (id UInt64, ts DateTime64(3,'UTC'), user LowCardinality(String), event LowCardinality(String), amount Float64, tags Array(String), n Nullable(Int32), flag Bool) ENGINE = MergeTree ORDER BY id"
SRC="SELECT number AS id, toDateTime64(1700000000 + number/1000, 3, 'UTC') AS ts, concat('user_', toString(number % 100)) AS user, ['click','view','purchase'][number % 3 + 1] AS event, number * 0.25 AS amount, arraySlice(['a','b','c'], 1, number % 4) AS tags, if(number % 5 = 0, NULL, toInt32(number % 1000)) AS n, number % 2 = 0 AS flag FROM numbers(1000000)"
for f in RowBinary Native JSONEachRow; do q "$SRC FORMAT $f" > "$TMP/data.$f"; done
# RowBinaryWithDefaults is RowBinary with a 0 flag byte before every value (no output format exists).
"${VENV:-$REPO/.venv}/bin/python" - "$TMP" <<'PY'
import sys
d = sys.argv[1]; data = open(d + '/data.RowBinary', 'rb').read(); out = bytearray(); i = 0
def varint(i):
    v = s = 0
    while True:
        b = data[i]; i += 1; v |= (b & 0x7f) << s; s += 7
        if b < 0x80: return v, i
while i < len(data):
    for w in (8, 8): out.append(0); out += data[i:i+w]; i += w          # id, ts
    for _ in range(2): out.append(0); l, j = varint(i); out += data[i:j+l]; i = j + l  # user, event
    out.append(0); out += data[i:i+8]; i += 8                          # amount
    out.append(0); cnt, k = varint(i)
    for _ in range(cnt): l, k2 = varint(k); k = k2 + l
    out += data[i:k]; i = k                                             # tags
    out.append(0); w = 1 if data[i] == 1 else 5; out += data[i:i+w]; i += w  # n
    out.append(0); out += data[i:i+1]; i += 1                           # flag
open(d + '/data.RowBinaryWithDefaults', 'wb').write(out)
PY
TCK=$(getconf CLK_TCK)
for round in 1 2 3; do
  for f in RowBinaryWithDefaults RowBinary Native JSONEachRow; do
    c0=$(awk '{print $14+$15}' "/proc/$PID/stat"); t0=$(date +%s.%N)
    curl -sS --fail-with-body "$CH?async_insert=0&query=INSERT%20INTO%20default.fmt_t%20FORMAT%20$f" --data-binary "@$TMP/data.$f"
    t1=$(date +%s.%N); c1=$(awk '{print $14+$15}' "/proc/$PID/stat")
    printf '%-22s %9.0f rows/s %6.2f CPU s/M (%s bytes)\n' "$f" "$(echo "1000000/($t1-$t0)" | bc -l)" \
      "$(echo "($c1-$c0)/$TCK" | bc -l)" "$(stat -c %s "$TMP/data.$f")"
  done
done
