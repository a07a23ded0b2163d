#!/usr/bin/env python3
"""Fault injection: chbridge against real servers while they crash, stall and rebalance.

Usage: .venv/bin/python scripts/chaos.py [--bin target/release/chbridge]
           [--mode at-least-once|exactly-once|both] [--short] [--seed 42]
           [--on-error dead-letter|skip]

Each run starts from scratch against PRIVATE servers on free ports of 127.0.0.1
(a ClickHouse from scripts/clickhouse_server.py with its data under
target/chaos/<mode>/<scenario>/clickhouse/, and a tansu broker with memory storage), so
the shared stack of scripts/stack.sh is never touched. While a background
thread produces JSON records (about 0.5% of them bad) to two topics at a steady
rate, the bridge is killed with -9, ClickHouse is stopped and frozen, the broker
is frozen and more replicas join and leave. Then one bridge drains everything,
and every table is compared id by id with what the broker acknowledged, and
the dead-letter topic with the bad records.

Each mode runs several scenarios, each from scratch: "classic" (the faults
above, shuffled) and one per delivery fault of the review that must not lose
or repeat a row: "stop-restart" (on_error = "stop" stops the bridge on a bad
record; it is restarted with dead letters), "dlq-freeze" (the broker frozen
while dead letters are being sent, then kill -9), "ch-down-rebalance"
(ClickHouse killed while a second replica joins and leaves), "alter" (ALTER
TABLE ... ADD / MODIFY / DROP COLUMN under load) and "replay-kills" (kill -9
during exactly-once replays with a 256 KiB memory budget). --short runs
classic, stop-restart and dlq-freeze with a small volume.

The last line of each scenario is
    chaos: produced=N lost=L duplicated=D mode=MODE scenario=S faults=F
and target/chaos/result.json holds every run. The exit status is 1 if any run
lost a row, holds a row it should not, misses a dead letter, did not drain or
could not be carried out, or duplicated a row in exactly-once mode.
Logs: target/chaos/<mode>/<scenario>/ (bridge-<replica>-<start>.log, tansu.log,
clickhouse/server-<start>.log).
"""
import argparse
import atexit
import collections
import dataclasses
import http.client
import json
import os
import random
import shutil
import signal
import string
import sys
import queue
import threading
import time
import traceback

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from stacklib import (REPO, Broker, ClickHouse, RunError, free_ports, http_get, kill_all, on_signal,
                      port_open, signal_group, spawn)

OUT = os.path.join(REPO, "target", "chaos")

PARTITIONS = 6
DLQ = "chaos_dlq"
# topic -> id prefix, and the tables the [[routes]] below send each topic to.
PREFIX = {"chaos_a": "a", "chaos_b": "b"}
TABLES_OF = {"chaos_a": ("t_a", "t_b"), "chaos_b": ("t_b",)}
TABLES = ("t_a", "t_b")
TABLE_DDL = """CREATE TABLE {name} (
    id String, seq UInt64, part UInt8, v Int32, payload String,
    CONSTRAINT v_not_13 CHECK v != 13
) ENGINE = MergeTree ORDER BY id SETTINGS non_replicated_deduplication_window = 10000"""

BAD_RATIO = 0.005
PAYLOAD_CHARS = string.ascii_letters + string.digits + " "
INSERTED_METRIC = "chbridge_batches_inserted_total"
ASSIGNED_METRIC = "chbridge_assigned_partitions"
SHUTDOWN_TIMEOUT_S = 10  # the bridges' shutdown_timeout
# More self-inflicted bridge exits than this and the run is hopeless (e.g. the
# same refused batch over and over): abort instead of restarting forever.
MAX_UNEXPECTED_EXITS = 30

# Per-record delivery state, one byte per sequence number of a topic.
PENDING, GOOD, BAD, FAILED = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Profile:
    rate: int                # records per second, both topics together
    warmup_s: float          # producing before the first fault
    gap_s: tuple             # pause after each fault, uniform in [lo, hi]
    tail_s: float            # producing after the last fault
    kills: int               # kill -9 of the bridge: in turn right after an insert, mid-insert, at random
    ch_stop_s: float         # ClickHouse killed and kept down this long
    broker_freeze_s: float   # tansu SIGSTOPped this long
    extra_replicas: int      # rebalance storm: 1 -> 1 + extra -> 1 replicas
    scale_hold_s: float      # how long the extra replicas run
    ch_freeze_s: float       # ClickHouse SIGSTOPped this long (> insert_timeout)
    drain_timeout_s: float
    deadline_s: float        # the whole mode, from start to result


FULL = Profile(rate=3000, warmup_s=10, gap_s=(4, 12), tail_s=5, kills=12, ch_stop_s=30,
               broker_freeze_s=20, extra_replicas=2, scale_hold_s=10, ch_freeze_s=12,
               drain_timeout_s=180, deadline_s=15 * 60)
SHORT = Profile(rate=500, warmup_s=4, gap_s=(1.5, 3), tail_s=2, kills=2, ch_stop_s=5,
                broker_freeze_s=5, extra_replicas=1, scale_hold_s=6, ch_freeze_s=7,
                drain_timeout_s=60, deadline_s=3 * 60)

# The scenarios of each profile (see the module's doc).
SCENARIOS = {
    "full": ("classic", "stop-restart", "dlq-freeze", "ch-down-rebalance", "alter", "replay-kills"),
    "short": ("classic", "stop-restart", "dlq-freeze"),
}


def say(msg):
    print("chaos: " + msg, flush=True)


# ---------------------------------------------------------------- processes

# Processes, servers and clean-up come from scripts/stacklib.py (shared with
# scripts/bench.py): spawn, kill_all, ClickHouse, Broker, ...

class Replica:
    """One chbridge process of the group; every start writes a new log."""

    def __init__(self, n, binary, config, http_port, directory):
        self.n, self.binary, self.config, self.http_port, self.dir = n, binary, config, http_port, directory
        self.proc, self.log, self.starts = None, None, 0

    def start(self):
        self.log = os.path.join(self.dir, "bridge-%d-%d.log" % (self.n, self.starts))
        self.starts += 1
        self.proc = spawn([self.binary, "run", "--config", self.config], self.log)

    def release(self):
        """Takes the process away from supervision (it is about to be stopped on purpose)."""
        p, self.proc = self.proc, None
        return p

    def metric(self, name):
        """Sum of a metric over its label sets, or None while the endpoint does not answer."""
        try:
            body = http_get(self.http_port, "/metrics").decode()
        except (OSError, http.client.HTTPException):
            return None
        return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                   if line.startswith(name + "{") or line.startswith(name + " "))

    def ready(self):
        try:
            http_get(self.http_port, "/readyz")
            return True
        except (OSError, http.client.HTTPException):
            return False


# ----------------------------------------------------------------- producer

class Feed(threading.Thread):
    """Produces records at a steady rate and keeps what the broker acknowledged.

    Ids are "<a|b>-<seq>" with a sequence per topic, partition seq % 6, so one
    byte per sequence number (status) is all the bookkeeping a million records
    need. Delivery callbacks run in this thread (poll), and after join() in the
    main thread (flush): never both at once.
    """

    def __init__(self, brokers, rate, seed, bad_kinds):
        super().__init__(name="feed", daemon=True)
        self.rate, self.bad_kinds = rate, bad_kinds
        self.rng = random.Random("%s/feed" % seed)
        self.producer = Producer({
            "bootstrap.servers": brokers, "acks": "all", "enable.idempotence": True,
            "linger.ms": 5, "log.connection.close": False,  # the broker goes at the end of each run
        })
        self.status = {t: bytearray() for t in PREFIX}
        self.kind_of = {}       # (topic, seq) -> bad kind, for bad records
        self.bad = []           # delivered bad records: (topic, partition, offset, kind)
        self.delivered = collections.Counter()  # (topic, partition) -> acknowledged records
        self.max_offset = {}    # (topic, partition) -> highest acknowledged offset
        self.failed = 0
        self.stopping = threading.Event()
        self.error = None
        # Bad records asked for by a fault (kind), sent by this thread.
        self.injections = queue.Queue()

    @property
    def produced(self):
        return sum(self.delivered.values())

    def run(self):
        try:
            # Token bucket capped at half a second of records, so a stall (a
            # full queue while the broker is frozen) is not followed by a burst.
            tokens, last = 0.0, time.monotonic()
            while not self.stopping.is_set():
                now = time.monotonic()
                tokens, last = min(tokens + (now - last) * self.rate, self.rate / 2), now
                while not self.injections.empty():
                    self.send_one(self.injections.get())
                while tokens >= 1 and not self.stopping.is_set():
                    self.send_one()
                    tokens -= 1
                self.producer.poll(0.005)
        except Exception as e:  # reported by the main thread's supervision
            self.error = repr(e)

    def inject(self, kind, n=1):
        """Asks for n bad records of `kind` (sent by the feed's own thread)."""
        for _ in range(n):
            self.injections.put(kind)

    def send_one(self, forced=None):
        rng = self.rng
        topic = "chaos_a" if rng.random() < 0.5 else "chaos_b"
        seq = len(self.status[topic])
        self.status[topic].append(PENDING)
        rid = "%s-%09d" % (PREFIX[topic], seq)
        part = seq % PARTITIONS
        v = rng.randint(-1000000, 1000000)
        kind = forced or (rng.choice(self.bad_kinds) if rng.random() < BAD_RATIO else None)
        if kind == "type":
            v = rng.choice(['"notanumber"', str(2 ** 31 + rng.randint(0, 10 ** 6))])
        elif kind == "check":
            v = 13
        elif v == 13:
            v = 14  # 13 is what the table's CHECK refuses
        payload = "".join(rng.choices(PAYLOAD_CHARS, k=rng.randint(20, 200)))
        value = '{"id":"%s","seq":%d,"part":%d,"v":%s,"payload":"%s"}' % (rid, seq, part, v, payload)
        if kind == "malformed":
            value = value[:rng.randint(1, len(value) - 2)]  # a strict prefix of an object
        if kind:
            self.kind_of[(topic, seq)] = kind
        while not self.stopping.is_set():
            try:
                self.producer.produce(topic, value.encode(), rid.encode(), partition=part,
                                      on_delivery=self.on_delivery)
                return
            except BufferError:  # local queue full: the broker is frozen
                self.producer.poll(0.05)

    def on_delivery(self, err, msg):
        topic, seq = msg.topic(), int(msg.key()[2:])
        if err is not None:
            self.status[topic][seq] = FAILED
            self.failed += 1
            return
        tp = (topic, msg.partition())
        self.delivered[tp] += 1
        self.max_offset[tp] = max(self.max_offset.get(tp, -1), msg.offset())
        kind = self.kind_of.get((topic, seq))
        if kind:
            self.status[topic][seq] = BAD
            self.bad.append((topic, msg.partition(), msg.offset(), kind))
        else:
            self.status[topic][seq] = GOOD

    def finish(self, timeout=60):
        """Stops producing and waits for the outstanding deliveries; returns how many never came."""
        self.stopping.set()
        self.join()
        return self.producer.flush(timeout)


# ---------------------------------------------------------------------- run

class Run:
    """One mode: private servers, faults while producing, drain, comparison."""

    def __init__(self, mode, args, profile, scenario="classic"):
        self.mode, self.args, self.profile, self.scenario = mode, args, profile, scenario
        self.t0 = time.monotonic()
        self.deadline = self.t0 + profile.deadline_s
        self.rng = random.Random("%s/faults/%s/%s" % (args.seed, mode, scenario))
        self.dir = os.path.join(OUT, mode, scenario)
        # A server left from an interrupted run may still be writing here:
        # say so rather than fail on a half-removed directory.
        shutil.rmtree(self.dir, ignore_errors=True)
        if os.path.exists(self.dir):
            raise SystemExit("chaos: cannot clear %s; is a server from an earlier run "
                             "still running? (pgrep -af %s)" % (self.dir, OUT))
        os.makedirs(self.dir)
        ports = free_ports(3 + 1 + profile.extra_replicas)
        self.ch = ClickHouse(os.path.join(self.dir, "clickhouse"), ports[0], ports[1])
        self.broker = Broker(self.dir, ports[2])
        self.replicas = {}
        for n, port in enumerate(ports[3:], start=1):
            config = os.path.join(self.dir, "bridge-%d.toml" % n)
            self.replicas[n] = Replica(n, args.bin, config, port, self.dir)
            self.reconfigure(self.replicas[n])
        self.feed = None
        self.faults = []
        self.unexpected_exits = []
        # Replicas a fault expects to exit by themselves: n -> exit code (None until it exits).
        self.expected_exits = {}
        # True while ClickHouse is down on purpose: supervision leaves it alone.
        self.ch_down = False

    def now(self):
        return round(time.monotonic() - self.t0, 1)

    def reconfigure(self, r, on_error=None, budget="32MiB", max_bytes="16MiB", commit="1s"):
        """Writes replica r's configuration (read at its next start)."""
        with open(r.config, "w") as f:
            f.write(self.bridge_config(r.http_port, on_error or self.args.on_error, budget, max_bytes,
                                       commit))

    def bridge_config(self, http_port, on_error, budget, max_bytes, commit):
        route_error = {"dead-letter": 'on_error = "dead-letter"\ndead_letter_topic = "%s"' % DLQ,
                       "skip": 'on_error = "skip"', "stop": 'on_error = "stop"'}[on_error]
        routes = "".join('[[routes]]\ntopics = [%s]\ntable = "%s"\n%s\n'
                         % (", ".join('"%s"' % t for t in PREFIX if table in TABLES_OF[t]), table, route_error)
                         for table in TABLES)
        # delivery is a new key: written only when not the default, so that
        # at-least-once runs also work with a binary that predates it.
        return """{delivery}shutdown_timeout = "{shutdown}s"
max_buffered_bytes = "{budget}"

[kafka]
brokers = "{brokers}"
group_id = "chaos-{mode}"

[kafka.properties]
"session.timeout.ms" = "3000"
"heartbeat.interval.ms" = "1000"

[clickhouse]
url = "http://127.0.0.1:{ch}"
database = "default"
insert_timeout = "5s"

[batch]
max_rows = 20000
max_bytes = "{max_bytes}"
max_wait = "200ms"

[commit]
interval = "{commit}"

[retry]
initial_backoff = "100ms"
max_backoff = "2s"

[http]
listen = "127.0.0.1:{http}"

[log]
level = "info,librdkafka=warn"

{routes}""".format(delivery='delivery = "exactly-once"\n' if self.mode == "exactly-once" else "",
                   shutdown=SHUTDOWN_TIMEOUT_S, budget=budget, max_bytes=max_bytes, commit=commit,
                   brokers=self.broker.address, mode=self.mode,
                   ch=self.ch.http_port, http=http_port, routes=routes)

    # -- supervision: every wait of the main thread goes through here

    def supervise(self):
        if time.monotonic() > self.deadline:
            raise RunError("deadline of %ds exceeded" % self.profile.deadline_s)
        if self.feed is not None and self.feed.error:
            raise RunError("producer failed: %s" % self.feed.error)
        if self.broker.proc.poll() is not None:
            raise RunError("tansu exited (code %s), see %s" % (self.broker.proc.returncode, self.broker.log))
        if not self.ch_down and self.ch.proc.poll() is not None:
            raise RunError("ClickHouse exited (code %s), see %s" % (self.ch.proc.returncode, self.ch.log))
        for r in self.replicas.values():
            if r.proc is None or r.proc.poll() is None:
                continue
            code = r.release().returncode
            if r.n in self.expected_exits:  # a fault waits for this exit
                self.expected_exits[r.n] = code
                continue
            # A finding, not a fault of ours: recorded, then the replica is restarted.
            self.unexpected_exits.append({"replica": r.n, "exit_code": code, "at_s": self.now(),
                                          "log": os.path.relpath(r.log, REPO)})
            say("bridge %d exited by itself with code %s at %.1fs (see %s)"
                % (r.n, code, self.now(), os.path.relpath(r.log, REPO)))
            if code == 1:  # configuration or start-up check: a restart cannot help
                raise RunError("bridge %d refused to start (exit 1), see %s" % (r.n, os.path.relpath(r.log, REPO)))
            if len(self.unexpected_exits) > MAX_UNEXPECTED_EXITS:
                raise RunError("bridges exited by themselves %d times" % len(self.unexpected_exits))
            r.start()

    def wait(self, seconds):
        end = time.monotonic() + seconds
        while True:
            self.supervise()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.1, left))

    def until(self, cond, timeout, what, step=0.1):
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                raise RunError("%s not within %ds" % (what, timeout))
            self.wait(step)

    def stop_replica(self, r, timeout=SHUTDOWN_TIMEOUT_S + 10):
        """SIGTERM; returns a description with the exit code (kill -9 after timeout)."""
        p = r.release()
        t = time.monotonic()
        signal_group(p, signal.SIGTERM)
        while p.poll() is None and time.monotonic() < t + timeout:
            self.wait(0.1)
        if p.poll() is None:
            signal_group(p, signal.SIGKILL)
            p.wait()
            say("bridge %d did not exit within %ds of SIGTERM: killed" % (r.n, timeout))
            return "replica %d SIGTERM: no exit within %ds, killed" % (r.n, timeout)
        if p.returncode != 0:
            say("bridge %d exited with code %d after SIGTERM (see %s)"
                % (r.n, p.returncode, os.path.relpath(r.log, REPO)))
        return "replica %d SIGTERM: exit %d after %.1fs" % (r.n, p.returncode, time.monotonic() - t)

    def kill_replica(self, r):
        p = r.release()
        signal_group(p, signal.SIGKILL)
        p.wait()

    # -- set-up

    def setup(self):
        self.broker.start()
        self.ch.start()
        self.until(lambda: port_open(self.broker.port), 30, "tansu listening")
        self.until(self.ch.ready, 60, "ClickHouse ready")
        for t in TABLES:
            self.ch.query(TABLE_DDL.format(name=t))
        admin = AdminClient({"bootstrap.servers": self.broker.address})
        want = {t: PARTITIONS for t in PREFIX}
        want[DLQ] = 1
        futures = admin.create_topics([NewTopic(t, num_partitions=n, replication_factor=1)
                                       for t, n in want.items()], operation_timeout=10)
        for f in futures.values():
            f.result(timeout=15)

        def topics_visible():
            md = admin.list_topics(timeout=5).topics
            return all(t in md and md[t].error is None and len(md[t].partitions) == n
                       for t, n in want.items())
        self.until(topics_visible, 30, "topics with all partitions", step=0.2)
        say("%s: ClickHouse http %d, tansu %d, logs in %s"
            % (self.mode, self.ch.http_port, self.broker.port, os.path.relpath(self.dir, REPO)))
        first = self.replicas[1]
        first.start()
        self.until(first.ready, 60, "bridge 1 ready (/readyz)", step=0.2)
        kinds = ["malformed", "type"] + ([] if self.args.no_check_violations else ["check"])
        self.feed = Feed(self.broker.address, self.profile.rate, self.args.seed, kinds)
        self.feed.start()

    # -- faults

    def inject(self, kind, action):
        start = self.now()
        detail = action()
        self.faults.append({"kind": kind, "start_s": start, "end_s": self.now(), "detail": detail})
        number = sum(f["kind"] == kind for f in self.faults)
        say("fault %s #%d at %.1fs (%s), over at %.1fs, produced %d"
            % (kind, number, start, detail, self.now(), self.feed.produced))

    def kill9(self, when):
        r = self.replicas[1]
        if when == "mid-insert":
            # ClickHouse frozen for longer than a batch's max_wait: an insert
            # (or an exactly-once range write) is on the wire, unanswered,
            # when the bridge dies; ClickHouse then resumes and may apply it.
            signal_group(self.ch.proc, signal.SIGSTOP)
            try:
                self.wait(0.8)
                self.kill_replica(r)
            finally:
                signal_group(self.ch.proc, signal.SIGCONT)
            how = "mid-insert"
            down = self.rng.uniform(0.5, 3)
            self.wait(down)
            r.start()
            return "%s, restarted %.1fs later" % (how, down)
        if when == "after-insert":
            # Right after an insert was acknowledged and (most likely) before
            # its offsets were committed: the window where rows repeat.
            how = "random (no insert within 10s)"
            before = r.metric(INSERTED_METRIC)
            end = time.monotonic() + 10
            while time.monotonic() < end:
                self.wait(0.01)
                now = r.metric(INSERTED_METRIC)
                if before is None:  # the endpoint was not up yet: this is the baseline
                    before = now
                elif now is not None and now != before:
                    how = "after insert"
                    break
        else:
            self.wait(self.rng.uniform(0, 2))
            how = "random"
        self.kill_replica(r)
        down = self.rng.uniform(0.5, 3)
        self.wait(down)
        r.start()
        return "%s, restarted %.1fs later" % (how, down)

    def ch_stop(self):
        self.ch_down = True
        self.ch.kill9()
        self.wait(self.profile.ch_stop_s)
        self.ch.start()
        t = time.monotonic()
        self.until(self.ch.ready, 60, "ClickHouse ready after restart")
        self.ch_down = False
        return "kill -9, down %ds, ready %.1fs after restart" % (self.profile.ch_stop_s, time.monotonic() - t)

    def freeze(self, proc, seconds, what):
        signal_group(proc, signal.SIGSTOP)
        try:
            self.wait(seconds)
        finally:
            signal_group(proc, signal.SIGCONT)
        return "%s SIGSTOP for %ds" % (what, seconds)

    def storm(self):
        extra = [self.replicas[n] for n in range(2, 2 + self.profile.extra_replicas)]
        t = time.monotonic()
        for r in extra:
            r.start()
        # Joins can be slow on this broker: the hold is stretched by up to
        # 10 s until every new replica owns partitions, so that stopping them
        # revokes real work.
        hold_end, owned_after = t + self.profile.scale_hold_s, None
        while True:
            now = time.monotonic()
            if owned_after is None and all((r.metric(ASSIGNED_METRIC) or 0) > 0 for r in extra):
                owned_after = now - t
            if now >= hold_end and (owned_after is not None or now >= hold_end + 10):
                break
            self.wait(0.2)
        owning = ("new replicas own partitions %.1fs after start" % owned_after if owned_after is not None
                  else "some new replica never owned a partition")
        # With two or more extra replicas the last one is killed, the others
        # stop cleanly (their revocation drains and commits).
        killed = extra[-1] if len(extra) > 1 else None
        if killed:
            self.kill_replica(killed)
        stops = [self.stop_replica(r) for r in extra if r is not killed]
        if killed:
            stops.append("replica %d kill -9" % killed.n)
        return "1->%d->1, %s; %s" % (1 + len(extra), owning, "; ".join(stops))

    # -- the delivery faults of the review, one scenario each

    def stop_restart(self):
        """on_error = "stop": a bad record stops the bridge (the commit stays
        below it, and with exactly-once no recorded range may claim it); the
        operator switches the route to dead letters and starts it again: the
        record must reach the dead-letter topic, every other row its table."""
        r = self.replicas[1]
        self.stop_replica(r)
        self.reconfigure(r, on_error="stop")
        # The first bad record stops it (one of the feed's, or this one).
        self.expected_exits[r.n] = None
        r.start()
        self.wait(1)
        self.feed.inject("type")
        self.until(lambda: self.expected_exits[r.n] is not None, 60, "bridge 1 stopping on a bad record")
        code = self.expected_exits.pop(r.n)
        if code != 2:
            raise RunError("bridge 1 stopped on a bad record with exit %s, not 2 (see %s)"
                           % (code, os.path.relpath(r.log, REPO)))
        self.wait(self.rng.uniform(0.5, 2))
        self.reconfigure(r)
        r.start()
        return "stopped on a bad record (exit 2), restarted with on_error = %s" % self.args.on_error

    def dlq_freeze(self):
        """Dead letters in flight when the broker freezes, then kill -9: their
        offsets (and, exactly-once, every range at or after them) must not be
        committed or recorded past them."""
        r = self.replicas[1]
        details = []
        for delay in (0.1, 0.3, 0.6):
            self.feed.inject("malformed", 30)  # dead letters sent by the consumer thread
            self.feed.inject("check", 10)      # refused by ClickHouse: sent by the sink
            self.wait(delay)
            signal_group(self.broker.proc, signal.SIGSTOP)
            try:
                self.wait(2)
                self.kill_replica(r)
            finally:
                signal_group(self.broker.proc, signal.SIGCONT)
            self.wait(self.rng.uniform(0.5, 2))
            r.start()
            self.wait(3)
            details.append("%.1fs" % delay)
        return "40 bad records, broker SIGSTOP %s later for 2s, kill -9 during it; x3" % "/".join(details)

    def ch_down_rebalance(self):
        """ClickHouse down while a second replica joins and leaves: the
        revocation drains cannot finish, inserts are being retried on both
        sides, and a partition's old owner must not insert what its new owner
        inserts."""
        r1, r2 = self.replicas[1], self.replicas[2]
        r2.start()
        self.until(lambda: (r2.metric(ASSIGNED_METRIC) or 0) > 0, 30, "bridge 2 owning partitions")
        self.wait(2)
        self.ch_down = True
        self.ch.kill9()
        self.wait(1)
        stop = self.stop_replica(r2)   # its revocation cannot drain
        self.wait(3)
        r2.start()                     # and joins again while ClickHouse is down
        self.wait(6)
        self.ch.start()
        self.until(self.ch.ready, 60, "ClickHouse ready after restart")
        self.ch_down = False
        self.wait(4)
        stop2 = self.stop_replica(r2)
        return "1->2 replicas, ClickHouse kill -9, %s, rejoin, ClickHouse back, %s; replica 1 %s" % (
            stop, stop2, "running" if r1.proc is not None else "down")

    def alter(self):
        """The tables change under load: rows not inserted yet are decoded
        again for the new columns."""
        done = []
        for stmt in ("ADD COLUMN note String DEFAULT 'n'", "MODIFY COLUMN seq Int64",
                     "DROP COLUMN note", "MODIFY COLUMN part UInt16"):
            for t in TABLES:
                self.ch.query("ALTER TABLE %s %s" % (t, stmt))
            done.append(stmt.split(" COLUMN ")[0].lower())
            self.wait(self.rng.uniform(*self.profile.gap_s))
        return "ALTER TABLE %s on both tables" % ", ".join(done)

    def replay_kills(self):
        """kill -9, a backlog, and a restart with a 256 KiB budget: the
        replays of the recorded ranges must complete although the tables are
        full; kill -9 again during them."""
        r = self.replicas[1]
        # Commits far apart: every partition's last range is replayed.
        self.kill_replica(r)
        self.reconfigure(r, commit="1h")
        r.start()
        self.until(r.ready, 60, "bridge 1 ready (/readyz)", step=0.2)
        self.wait(4)
        details = []
        for _ in range(3):
            self.kill_replica(r)
            self.wait(self.rng.uniform(2, 4))  # a backlog builds up
            # Replays cut at ranges recorded with the larger batches of before.
            self.reconfigure(r, budget="256KiB", max_bytes="64KiB", commit="1h")
            r.start()
            self.until(r.ready, 60, "bridge 1 ready (/readyz)", step=0.2)
            if self.mode == "exactly-once":
                self.until(lambda: (r.metric("chbridge_exactly_once_replays_total") or 0) > 0,
                           30, "a replay after the restart")
            self.wait(self.rng.uniform(0.1, 1.0))
            replays = r.metric("chbridge_exactly_once_replays_total") or 0
            details.append("%d replays" % replays)
        self.kill_replica(r)
        self.reconfigure(r)
        self.wait(1)
        r.start()
        return "kill -9 then restart with max_buffered_bytes 256KiB, x3 (killed after %s)" % ", ".join(details)

    def faults_phase(self):
        p = self.profile
        self.wait(p.warmup_s)
        if self.scenario != "classic":
            action = {"stop-restart": self.stop_restart, "dlq-freeze": self.dlq_freeze,
                      "ch-down-rebalance": self.ch_down_rebalance, "alter": self.alter,
                      "replay-kills": self.replay_kills}[self.scenario]
            self.inject(self.scenario, action)
            self.wait(p.tail_s)
            return
        kill_kinds = ("after-insert", "mid-insert", "random")
        plan = [("kill9", lambda i=i: self.kill9(kill_kinds[i % 3])) for i in range(p.kills)]
        plan += [
            ("clickhouse-stop", self.ch_stop),
            ("broker-freeze", lambda: self.freeze(self.broker.proc, p.broker_freeze_s, "tansu")),
            ("rebalance-storm", self.storm),
            # clickhouse_server.py runs ClickHouse in-process (chdb), so
            # stopping its process freezes the server itself.
            ("clickhouse-freeze", lambda: self.freeze(self.ch.proc, p.ch_freeze_s, "ClickHouse")),
        ]
        self.rng.shuffle(plan)
        for kind, action in plan:
            self.inject(kind, action)
            self.wait(self.rng.uniform(*p.gap_s))
        self.wait(p.tail_s)

    # -- drain and checks

    def drain(self):
        """One bridge, until every partition is committed to its end and the tables are still.

        Returns None when drained, else what was left. The end of a partition
        is the number of records the broker acknowledged there: tansu's
        ListOffsets(LATEST) is wrong.
        """
        for n, r in self.replicas.items():
            if n != 1 and r.proc is not None:
                self.stop_replica(r)
        if self.replicas[1].proc is None:
            self.replicas[1].start()
        ends = dict(self.feed.delivered)
        tps = [TopicPartition(t, p) for t in PREFIX for p in range(PARTITIONS)]
        c = Consumer({"bootstrap.servers": self.broker.address, "group.id": "chaos-" + self.mode,
                      "enable.auto.commit": False})
        end = time.monotonic() + self.profile.drain_timeout_s
        last_counts, behind = None, {}
        try:
            while time.monotonic() < end:
                try:
                    committed = {(tp.topic, tp.partition): tp.offset for tp in c.committed(tps, timeout=10)}
                except KafkaException as e:
                    behind = {"committed offsets": str(e)}
                    self.wait(1)
                    continue
                # >=: a record the broker took but never acknowledged would sit past the end.
                behind = {"%s/%d" % k: [committed.get(k, -1), n] for k, n in sorted(ends.items())
                          if committed.get(k, -1) < n}
                if not behind:
                    counts = [self.count(t) for t in TABLES]
                    if counts == last_counts:
                        return None
                    last_counts = counts
                self.wait(1)
        finally:
            c.close()
        # 0 here means the group never gave the bridge its partitions back.
        return {"partitions behind [committed, end]": behind,
                "partitions owned by bridge 1": self.replicas[1].metric(ASSIGNED_METRIC)}

    def count(self, table):
        return int(self.ch.query("SELECT count() FROM %s FORMAT TSV" % table))

    def compare(self):
        """Every table id by id against the acknowledged good records."""
        status = self.feed.status
        stats = {}
        for table in TABLES:
            topics = [t for t in PREFIX if table in TABLES_OF[t]]
            by_prefix = {PREFIX[t].encode(): t for t in topics}
            seen = {t: bytearray(len(status[t])) for t in topics}
            rows = ids = duplicated = unexpected = not_acknowledged = 0
            with self.ch.open("SELECT id, count() FROM %s GROUP BY id FORMAT TSV" % table, 300) as resp:
                for line in resp:
                    rid, n = line.rstrip(b"\n").split(b"\t")
                    n = int(n)
                    rows, ids = rows + n, ids + 1
                    topic = by_prefix.get(rid[:1])
                    seq = int(rid[2:]) if topic and rid[1:2] == b"-" and rid[2:].isdigit() else -1
                    state = status[topic][seq] if 0 <= seq < len(status[topic]) else BAD
                    if state == GOOD:
                        seen[topic][seq] = 1
                        duplicated += n - 1
                    elif state in (PENDING, FAILED):
                        not_acknowledged += 1  # may have landed; the producer cannot tell
                    else:
                        unexpected += 1
            lost_sample, lost = [], 0
            for t in topics:
                for seq, st in enumerate(status[t]):
                    if st == GOOD and not seen[t][seq]:
                        lost += 1
                        if len(lost_sample) < 10:
                            lost_sample.append("%s-%09d" % (PREFIX[t], seq))
            stats[table] = {"rows": rows, "ids": ids, "lost": lost, "duplicated": duplicated,
                            "unexpected": unexpected, "unacknowledged_present": not_acknowledged,
                            "lost_sample": lost_sample}
        return stats

    def check_dlq(self):
        """Each bad record must be in the dead-letter topic once per route that refused it."""
        expected = {(table, topic, p, o) for topic, p, o, _ in self.feed.bad for table in TABLES_OF[topic]}
        c = Consumer({"bootstrap.servers": self.broker.address, "group.id": "chaos-dlq-reader",
                      "enable.auto.commit": False, "fetch.queue.backoff.ms": 10})
        tp = TopicPartition(DLQ, 0, OFFSET_BEGINNING)
        c.assign([tp])
        seen, classes, records, next_offset = set(), collections.Counter(), 0, 0
        idle_end = time.monotonic() + 10
        try:
            while True:
                self.supervise()
                msg = c.poll(0.5)
                if msg is not None and msg.error() is None:
                    records, next_offset = records + 1, msg.offset() + 1
                    idle_end = time.monotonic() + 10
                    h = {k: (v or b"").decode("utf-8", "replace") for k, v in (msg.headers() or [])}
                    try:
                        seen.add((h.get("chbridge.table", "").rsplit(".", 1)[-1], h.get("chbridge.origin.topic"),
                                  int(h["chbridge.origin.partition"]), int(h["chbridge.origin.offset"])))
                    except (KeyError, ValueError):
                        classes["(origin headers missing)"] += 1
                    classes[h.get("chbridge.error.class", "(no class)")] += 1
                    continue
                # The high watermark from fetch responses is right (ListOffsets is not).
                _, high = c.get_watermark_offsets(tp, cached=True)
                if (high >= 0 and next_offset >= high) or time.monotonic() > idle_end:
                    break
        finally:
            c.close()
        missing = expected - seen
        return {"records": records, "missing": len(missing), "not_bad": len(seen - expected),
                "missing_sample": sorted(missing)[:10], "error_classes": dict(classes)}

    # -- the whole run

    def execute(self):
        result = {"mode": self.mode, "scenario": self.scenario, "produced": 0, "expected_rows": 0, "lost": None, "duplicated": None,
                  "unexpected": None, "dlq_missing": None, "faults": self.faults,
                  "bridge_unexpected_exits": self.unexpected_exits, "duration_s": None, "failures": []}
        try:
            self.setup()
            self.faults_phase()
            undelivered = self.feed.finish()
            self.fill_produced(result, undelivered)
            say("%s: producing stopped at %.1fs, produced %d; draining"
                % (self.mode, self.now(), result["produced"]))
            left = self.drain()
            result["drained"] = left is None
            if left is not None:
                result["failures"].append("drain timeout after %ds: %s"
                                          % (self.profile.drain_timeout_s, json.dumps(left)))
            result["final_stop"] = self.stop_replica(self.replicas[1])
            say("%s: %s at %.1fs; comparing" % (self.mode, "drained" if left is None else "NOT drained", self.now()))
            tables = self.compare()
            result["tables"] = tables
            for key in ("lost", "duplicated", "unexpected"):
                result[key] = sum(s[key] for s in tables.values())
            if self.args.on_error == "dead-letter":
                dlq = self.check_dlq()
                result["dlq"] = dlq
                result["dlq_missing"] = dlq["missing"]
        except Exception as e:  # any failure is a failed run, with a result
            if not isinstance(e, RunError):
                traceback.print_exc()
            result["failures"].append("aborted at %.1fs: %s" % (self.now(), e))
            if self.feed is not None and "bad_records" not in result:
                self.feed.stopping.set()
                self.feed.join(timeout=5)
                self.fill_produced(result, None)
        finally:
            kill_all()
        result["duration_s"] = self.now()
        if result["lost"]:
            result["failures"].append("%d rows lost" % result["lost"])
        if result["unexpected"]:
            result["failures"].append("%d ids that should not be in the tables" % result["unexpected"])
        if result["dlq_missing"]:
            result["failures"].append("%d dead letters missing" % result["dlq_missing"])
        if result["duplicated"] and self.mode == "exactly-once":
            result["failures"].append("%d duplicated rows in exactly-once mode" % result["duplicated"])
        return result

    def fill_produced(self, result, undelivered):
        feed = self.feed
        good = {t: feed.status[t].count(GOOD) for t in PREFIX}
        result["produced"] = feed.produced
        result["expected_rows"] = sum(good[t] * len(TABLES_OF[t]) for t in PREFIX)
        result["bad_records"] = dict(collections.Counter(kind for *_, kind in feed.bad))
        result["delivery_failed"] = feed.failed
        result["undelivered"] = undelivered
        # Acknowledged offsets of a partition should be exactly 0..n-1.
        result["offset_gaps"] = sum(feed.max_offset[k] + 1 - n for k, n in feed.delivered.items())


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default=os.path.join(REPO, "target", "release", "chbridge"))
    ap.add_argument("--mode", choices=("at-least-once", "exactly-once", "both"), default="both")
    ap.add_argument("--short", action="store_true", help="a few faults, a small volume (make test)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--scenario", action="append", help="run only these scenarios (repeatable)")
    ap.add_argument("--on-error", choices=("dead-letter", "skip"), default="dead-letter",
                    help="the routes' on_error; skip also skips the dead-letter check")
    # For binaries that stop on a refused batch instead of bisecting it.
    ap.add_argument("--no-check-violations", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.bin = os.path.abspath(args.bin)
    if not os.access(args.bin, os.X_OK):
        sys.exit("chaos: no executable at %s (cargo build --release?)" % args.bin)

    atexit.register(kill_all)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    os.makedirs(OUT, exist_ok=True)
    result_path = os.path.join(OUT, "result.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    profile = SHORT if args.short else FULL
    modes = ("at-least-once", "exactly-once") if args.mode == "both" else (args.mode,)
    scenarios = SCENARIOS["short" if args.short else "full"]
    if args.scenario:
        unknown = set(args.scenario) - set(SCENARIOS["full"])
        if unknown:
            sys.exit("chaos: unknown scenario(s) %s; known: %s" % (", ".join(sorted(unknown)),
                                                                  ", ".join(SCENARIOS["full"])))
        scenarios = tuple(args.scenario)
    runs = []
    for mode in modes:
        for scenario in scenarios:
            say("%s/%s: %s run, seed %d, %s"
                % (mode, scenario, "short" if args.short else "full", args.seed, args.bin))
            r = Run(mode, args, profile, scenario).execute()
            runs.append(r)
            with open(result_path + ".tmp", "w") as f:
                json.dump({"runs": runs}, f, indent=2)
            os.replace(result_path + ".tmp", result_path)
            for failure in r["failures"]:
                say("%s/%s: FAILED: %s" % (mode, scenario, failure))
            exits = r["bridge_unexpected_exits"]
            if exits:
                say("%s/%s: %d unexpected bridge exits (replica:code@time): %s%s"
                    % (mode, scenario, len(exits), ", ".join("%d:%s@%.1fs" % (e["replica"], e["exit_code"], e["at_s"])
                                                             for e in exits[:10]), ", ..." if len(exits) > 10 else ""))
            say("%s/%s: expected_rows=%d unexpected=%s dlq_missing=%s duration=%.1fs, details in %s"
                % (mode, scenario, r["expected_rows"], fmt(r["unexpected"]), fmt(r["dlq_missing"]), r["duration_s"],
                   os.path.relpath(result_path, REPO)))
            say("produced=%d lost=%s duplicated=%s mode=%s scenario=%s faults=%d"
                % (r["produced"], fmt(r["lost"]), fmt(r["duplicated"]), mode, scenario, len(r["faults"])))
    say("summary:")
    for r in runs:
        say("  %-13s %-18s produced=%-7d lost=%-4s duplicated=%-5s dlq_missing=%-4s %s"
            % (r["mode"], r["scenario"], r["produced"], fmt(r["lost"]), fmt(r["duplicated"]),
               fmt(r["dlq_missing"]), "ok" if not r["failures"] else "FAILED"))
    sys.exit(1 if any(r["failures"] for r in runs) else 0)


def fmt(v):
    return "n/a" if v is None else str(v)


if __name__ == "__main__":
    main()
