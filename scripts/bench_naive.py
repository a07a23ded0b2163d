#!/usr/bin/env python3
"""The consumer a user writes in an afternoon: Kafka JSON -> ClickHouse, 10,000 rows per insert.

Usage: bench_naive.py --brokers B --topic T --group G --url http://127.0.0.1:8123/ --table T
                      [--count N] [--batch 10000] [--max-wait 1.0]

Reads JSON messages with confluent-kafka, sends each batch as JSONEachRow over
HTTP (async_insert=0), then commits the offsets (at-least-once). A batch goes
out at --batch rows or --max-wait seconds after its first row. Stops after
--count rows (0: never) and prints {"rows": N, "inserts": I}. One deviation
from librdkafka's defaults: fetch.queue.backoff.ms=10 (its 1000 ms default
idles the consumer about 1 s whenever its prefetch queue fills).
"""
import argparse
import json
import time
import urllib.parse
import urllib.request

from confluent_kafka import Consumer

ap = argparse.ArgumentParser()
for flag in ("--brokers", "--topic", "--group", "--url", "--table"):
    ap.add_argument(flag, required=True)
ap.add_argument("--count", type=int, default=0)
ap.add_argument("--batch", type=int, default=10000)
ap.add_argument("--max-wait", type=float, default=1.0)
a = ap.parse_args()

consumer = Consumer({"bootstrap.servers": a.brokers, "group.id": a.group, "auto.offset.reset": "earliest",
                     "enable.auto.commit": False, "fetch.queue.backoff.ms": 10,
                     "session.timeout.ms": 6000, "heartbeat.interval.ms": 2000})
consumer.subscribe([a.topic], on_assign=lambda c, ps: print("assigned %d partitions" % len(ps), flush=True))
insert_url = a.url + "?" + urllib.parse.urlencode(
    {"query": "INSERT INTO %s FORMAT JSONEachRow" % a.table, "async_insert": 0})
rows, inserts, batch, first = 0, 0, [], 0.0
while a.count == 0 or rows < a.count:
    for msg in consumer.consume(num_messages=a.batch - len(batch), timeout=0.1):
        if msg.error():
            print("kafka error: %s" % msg.error(), flush=True)
        elif msg.value():
            if not batch:
                first = time.monotonic()
            batch.append(msg.value())
    if batch and (len(batch) >= a.batch or time.monotonic() - first >= a.max_wait):
        urllib.request.urlopen(insert_url, data=b"\n".join(batch), timeout=60).read()  # raises on error
        consumer.commit(asynchronous=False)
        rows, inserts, batch = rows + len(batch), inserts + 1, []
consumer.close()
print(json.dumps({"rows": rows, "inserts": inserts}), flush=True)
