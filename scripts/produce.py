#!/usr/bin/env python3
"""Produce demo JSON events to a Kafka topic (used by `make demo`).

Usage: produce.py [--brokers 127.0.0.1:9092] --topic T --count N
                  [--partitions 4] [--bad K] [--seed 42] [--start RFC3339]

Creates the topic with P partitions if missing (the tansu broker cannot add
partitions later), then sends N valid JSON objects, one per message, plus K
malformed messages mixed in at random positions. acks=all; exits non-zero
unless every message was delivered. Same seed and --start, same messages.
"""
import argparse
import datetime
import json
import random
import sys
import time

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

# Broken in different ways: not JSON, truncated, wrong top-level type,
# wrong field type, empty, invalid UTF-8.
BAD = [
    b"not json at all",
    b'{"id": 1, "ts": "2024-01-01T00:00:00Z", "user": "user_1"',
    b"[1, 2, 3]",
    b'{"id": "not-a-number", "ts": "yesterday", "event": 42}',
    b"",
    b'{"id": 7, "user": "\xff\xfe"}',
]


def ensure_topic(brokers, topic, partitions, timeout=30.0):
    admin = AdminClient({"bootstrap.servers": brokers})
    md = admin.list_topics(timeout=timeout)
    if topic in md.topics and md.topics[topic].error is None:
        have = len(md.topics[topic].partitions)
        if have != partitions:
            print("topic %s exists with %d partitions (asked %d); using it"
                  % (topic, have, partitions), file=sys.stderr)
        return
    fut = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)],
                              operation_timeout=timeout)[topic]
    try:
        fut.result(timeout=timeout)
    except KafkaException as e:
        if e.args[0].code() != 36:  # TOPIC_ALREADY_EXISTS: lost a race, fine
            raise
    # Wait until the metadata shows every partition.
    deadline = time.time() + timeout
    while time.time() < deadline:
        t = admin.list_topics(topic=topic, timeout=5).topics.get(topic)
        if t is not None and t.error is None and len(t.partitions) == partitions:
            return
        time.sleep(0.1)
    sys.exit("topic %s not visible after %.0f s" % (topic, timeout))


def events(count, rng, start):
    for i in range(count):
        ts = start + datetime.timedelta(milliseconds=i * 37 + rng.randint(0, 36))
        yield {
            "id": i + 1,
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "user": "user_%d" % rng.randint(1, 100),
            "event": rng.choice(["click", "view", "purchase"]),
            "amount": round(rng.uniform(0, 500), 2),
            "tags": rng.sample(["a", "b", "c", "d"], rng.randint(0, 3)),
        }


def send_all(brokers, topic, messages):
    """Produces (key, value) pairs with acks=all and an idempotent producer,
    waits for every delivery report; returns (delivered, errors, undelivered)."""
    delivered, failed = 0, []

    def on_delivery(err, _msg):
        nonlocal delivered
        if err is None:
            delivered += 1
        else:
            failed.append(err)

    p = Producer({"bootstrap.servers": brokers, "acks": "all", "linger.ms": 5,
                  "enable.idempotence": True})
    for key, value in messages:
        while True:
            try:
                p.produce(topic, key=key, value=value, on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: let deliveries drain
                p.poll(0.1)
        p.poll(0)
    left = p.flush(60)  # before reading `delivered`: the reports arrive in flush
    return delivered, failed, left


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brokers", default="127.0.0.1:9092")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--bad", type=int, default=0, help="number of malformed messages to mix in")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--start", help="first event time, RFC3339 UTC (default: now)")
    a = ap.parse_args()

    ensure_topic(a.brokers, a.topic, a.partitions)

    rng = random.Random(a.seed)
    # Event times start now by default so a demo shows recent data; pass
    # --start for byte-identical runs.
    if a.start:
        start = datetime.datetime.fromisoformat(a.start.replace("Z", "+00:00"))
    else:
        start = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    msgs = [json.dumps(e, separators=(",", ":")).encode() for e in events(a.count, rng, start)]
    for k in range(a.bad):
        msgs.insert(rng.randint(0, len(msgs)), BAD[k % len(BAD)])

    delivered, failed, left = send_all(a.brokers, a.topic, ((None, m) for m in msgs))

    print("delivered %d/%d messages (%d malformed) to %s" % (delivered, len(msgs), a.bad, a.topic))
    if failed or left:
        sys.exit("failed: %d errors (first: %s), %d undelivered"
                 % (len(failed), failed[0] if failed else None, left))


if __name__ == "__main__":
    main()
