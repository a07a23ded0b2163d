#!/usr/bin/env python3
"""Produce deterministic test rows in one input format and write the rows
ClickHouse should end up with.

Usage:
  produce_formats.py [--brokers 127.0.0.1:9092] --topic T
      --format avro|avro-file|protobuf|protobuf-file|csv|tsv|raw --count N
      [--registry URL] [--registry-user U:P] [--registry-ca FILE]
      [--expected FILE] [--schema-out FILE] [--seed 42] [--partitions 1]

Every format carries the same logical rows (same --seed, same rows), for the
table
  id UInt64, name String, price Decimal(18, 4), ts DateTime64(3, 'UTC'),
  ts_us DateTime64(6, 'UTC'), day Date32, uid UUID, tags Array(String),
  attrs Map(String, Int32), score Nullable(Float64), ok Bool,
  kind Enum8('a' = 1, 'b' = 2), inner_city String, inner_zip Int32
(inner_* come from the nested record `inner`; csv/tsv carry them as plain
columns). raw carries the text `line <id> <name>` for a table `line String`.

Formats:
  avro           Confluent framing (magic 0, 4-byte schema id) via
                 AvroSerializer, auto-registered under subject T-value. The
                 first count//2 rows use a v1 writer schema without `score` and
                 `tags` (expected: score null, tags []), the rest the full
                 schema: two schema ids in one topic.
  avro-file      plain Avro binary of the full schema (no header);
                 --schema-out writes the .avsc (= tests/data/formats.avsc).
  protobuf       Confluent framing + message indexes via ProtobufSerializer,
                 message chbridge.test.Row from tests/data/formats.proto (the
                 second message: indexes [1], bytes 02 02).
  protobuf-file  plain protobuf bytes of Row; --schema-out writes a
                 FileDescriptorSet (with imports) holding chbridge.test.Row.
  csv            one RFC 4180 line per message, table column order; tags and
                 attrs as JSON text; score empty for NULL.
  tsv            ClickHouse TabSeparated escaping; \\N for NULL.
  raw            `line <id> <name>`.

Keys are str(id); acks=all. --expected writes JSONEachRow that ClickHouse's
own parser reads exactly (price "123.4500", ts "2024-01-31 12:00:00.123", ts_us
with 6 digits, day "YYYY-MM-DD", score null or a number, ok true/false, kind
"a"/"b"). Map entries are in key order (code points = UTF-8 bytes, the
empty key last) in every format and in --expected; protobuf payloads use
deterministic serialization for that (Python's default order is upb's hash
order, and its deterministic order puts the empty key last), so a bridge that
keeps wire order matches --expected exactly. Other producers may not sort: a
test of order-independence should compare mapSort(attrs). Every 50th id is
2^53 + i (catches JSON-as-float). csv quotes a field when it holds , " CR LF
or a backslash, has leading/trailing spaces, or is exactly \\N.
Prints one JSON summary line on stdout (delivered count, schema ids seen).
"""
import argparse
import datetime
import decimal
import io
import json
import os
import random
import struct
import sys
import tempfile
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_FILE = os.path.join(REPO, "tests", "data", "formats.proto")
AVSC_FILE = os.path.join(REPO, "tests", "data", "formats.avsc")

FORMATS = ["avro", "avro-file", "protobuf", "protobuf-file", "csv", "tsv", "raw"]
EPOCH = datetime.datetime(1970, 1, 1)
EPOCH_DATE = datetime.date(1970, 1, 1)

# ---------------------------------------------------------------------------
# Rows

NAME_PARTS = [
    "alice", "Bob", "Zoë", "naïve café", "東京都", "Ελληνικά", "עברית", "Здравствуй", "🚀 rocket", "👩‍💻",
    "O'Brien", 'say "hi"', "a,b,c", "tab\there", "line1\nline2", "back\\slash", "\\N", "NULL", "semi;colon",
    " padded ", "trailing ", "[not,json]", '{"k":1}', "x" * 300, "ünïcödé\t\"mix\",\n\\",
]
TAG_POOL = ["red", "blue", "ß", "日本", "comma,tag", 'quote"tag', "", "[bracket]", "back\\slash", "tab\ttag",
            "new\nline", "🙂"]
ATTR_KEYS = ["k", "count", "ключ", "clé", "键", "emoji🙂", "a,b", 'q"k', "tab\tkey", "", "Zürich"]
CITIES = ["Berlin", "São Paulo", "Zürich", "Москва", "北京", "", "Los Angeles, CA", 'The "Big" Apple',
          "tab\tcity", "Reykjavík"]

TS_MIN = -2208988800000            # 1900-01-01 00:00:00.000 UTC, in ms
TS_1970 = 0
TS_MAX = 4102444800000 - 1         # 2099-12-31 23:59:59.999
DAY_MIN = (datetime.date(1900, 1, 1) - EPOCH_DATE).days     # -25567
DAY_MAX = (datetime.date(2299, 12, 31) - EPOCH_DATE).days   # 120529
DEC_MAX = 10 ** 18 - 1             # Decimal(18, 4) unscaled
INT32_MIN, INT32_MAX = -2 ** 31, 2 ** 31 - 1
SCORE_EDGES = [0.0, 1e-05, -2.5, 0.1, 123456789.125, 1e300, -1.7976931348623157e308, 5e-324, 3.141592653589793]


def gen_rows(count, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        # A few ids past 2^53 catch JSON-as-float parsing.
        rid = i + 1 if i % 50 != 49 else 2 ** 53 + i
        name = " ".join(rng.choice(NAME_PARTS) for _ in range(rng.randint(0, 3)))
        r = rng.random()
        if r < 0.05:
            unscaled = rng.choice([DEC_MAX, -DEC_MAX, 0, 1, -1])
        elif r < 0.35:
            unscaled = rng.randint(-DEC_MAX, DEC_MAX)
        else:
            unscaled = rng.randint(-10 ** 9, 10 ** 9)
        r = rng.random()
        if r < 0.05:
            ts = rng.choice([0, -1, TS_MIN, TS_MAX, 1000, -1000])
        elif r < 0.25:
            ts = rng.randint(TS_MIN, -1)
        else:
            ts = rng.randint(TS_1970, TS_MAX)
        ts_us = rng.choice([0, 1, TS_MAX * 1000 + 999]) if rng.random() < 0.05 else rng.randint(0, TS_MAX * 1000 + 999)
        day = rng.choice([DAY_MIN, DAY_MAX, 0, -1]) if rng.random() < 0.08 else rng.randint(DAY_MIN, DAY_MAX)
        uid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        tags = [] if rng.random() < 0.3 else [rng.choice(TAG_POOL) for _ in range(rng.randint(1, 4))]
        attrs = {}
        if rng.random() >= 0.3:
            for _ in range(rng.randint(1, 4)):
                v = rng.choice([INT32_MIN, INT32_MAX, 0]) if rng.random() < 0.15 else rng.randint(-1000, 100000)
                attrs[rng.choice(ATTR_KEYS)] = v
        # Key order (code points = UTF-8 bytes), the empty key last: the
        # order of upb's deterministic protobuf serialization.
        attrs = dict(sorted(attrs.items(), key=lambda kv: (kv[0] == "", kv[0])))
        r = rng.random()
        if r < 0.25:
            score = None
        elif r < 0.35:
            score = rng.choice(SCORE_EDGES)
        else:
            score = round(rng.uniform(-1000, 1000), 3)
        city = rng.choice(CITIES)
        zip_ = rng.choice([0, INT32_MIN, INT32_MAX, -1]) if rng.random() < 0.1 else rng.randint(1000, 99999)
        rows.append({
            "id": rid, "name": name, "unscaled": unscaled, "ts_ms": ts, "ts_us": ts_us, "day": day, "uid": uid,
            "tags": tags, "attrs": attrs, "score": score, "ok": rng.random() < 0.5, "kind": rng.choice("ab"),
            "city": city, "zip": zip_,
        })
    return rows


def price_text(unscaled):
    sign = "-" if unscaled < 0 else ""
    q, r = divmod(abs(unscaled), 10000)
    return "%s%d.%04d" % (sign, q, r)


def price_decimal(unscaled):
    return decimal.Decimal(unscaled).scaleb(-4)


def ts_text(ms):
    return (EPOCH + datetime.timedelta(milliseconds=ms)).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def ts_us_text(us):
    return (EPOCH + datetime.timedelta(microseconds=us)).strftime("%Y-%m-%d %H:%M:%S.%f")


def day_text(days):
    return (EPOCH_DATE + datetime.timedelta(days=days)).isoformat()


def json_text(v):
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def expected_row(row, fmt, v1=False):
    if fmt == "raw":
        return {"line": raw_text(row)}
    return {
        "id": row["id"], "name": row["name"], "price": price_text(row["unscaled"]), "ts": ts_text(row["ts_ms"]),
        "ts_us": ts_us_text(row["ts_us"]), "day": day_text(row["day"]), "uid": row["uid"],
        "tags": [] if v1 else row["tags"], "attrs": row["attrs"], "score": None if v1 else row["score"],
        "ok": row["ok"], "kind": row["kind"], "inner_city": row["city"], "inner_zip": row["zip"],
    }


def raw_text(row):
    return "line %d %s" % (row["id"], row["name"])


# ---------------------------------------------------------------------------
# Text formats

def csv_field(s):
    # RFC 4180 quoting when needed; also for the cases a ClickHouse-style CSV
    # reader would otherwise take differently (\N, leading/trailing space,
    # backslashes).
    if s == "" or not any(c in s for c in ',"\r\n\\') and s == s.strip() and s != "\\N":
        return s
    return '"' + s.replace('"', '""') + '"'


def text_columns(row):
    """Table-ordered text values, None for NULL."""
    return [str(row["id"]), row["name"], price_text(row["unscaled"]), ts_text(row["ts_ms"]),
            ts_us_text(row["ts_us"]), day_text(row["day"]), row["uid"], json_text(row["tags"]),
            json_text(row["attrs"]), None if row["score"] is None else repr(row["score"]),
            "true" if row["ok"] else "false", row["kind"], row["city"], str(row["zip"])]


def csv_line(row):
    return ",".join("" if v is None else csv_field(v) for v in text_columns(row))


TSV_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\0": "\\0", "\b": "\\b", "\f": "\\f"}


def tsv_field(s):
    if s is None:
        return "\\N"
    return "".join(TSV_ESCAPES.get(c, c) for c in s)


def tsv_line(row):
    return "\t".join(tsv_field(v) for v in text_columns(row))


# ---------------------------------------------------------------------------
# Avro

def avro_schema(v1=False):
    """tests/data/formats.avsc; v1 = the same without `tags` and `score`."""
    with open(AVSC_FILE, encoding="utf-8") as f:
        schema = json.load(f)
    if v1:
        schema["fields"] = [f for f in schema["fields"] if f["name"] not in ("tags", "score")]
    return schema


def avro_record(row, v1=False):
    rec = {
        "id": row["id"], "name": row["name"], "price": price_decimal(row["unscaled"]), "ts": row["ts_ms"],
        "ts_us": row["ts_us"], "day": row["day"], "uid": row["uid"], "tags": row["tags"], "attrs": row["attrs"],
        "score": row["score"], "ok": row["ok"], "kind": row["kind"],
        "inner": {"city": row["city"], "zip": row["zip"]},
    }
    if v1:
        del rec["tags"], rec["score"]
    return rec


# ---------------------------------------------------------------------------
# Protobuf

def compile_proto(outdir):
    """Compile formats.proto into outdir: formats_pb2.py and formats.desc
    (a FileDescriptorSet with imports). Returns the generated module."""
    import importlib
    import importlib.resources
    from grpc_tools import protoc
    include = str(importlib.resources.files("grpc_tools") / "_proto")
    src = os.path.dirname(PROTO_FILE)
    rc = protoc.main(["protoc", "-I" + src, "-I" + include, "--python_out=" + outdir, "--include_imports",
                      "--descriptor_set_out=" + os.path.join(outdir, "formats.desc"), PROTO_FILE])
    if rc != 0:
        sys.exit("protoc failed on %s (rc %d)" % (PROTO_FILE, rc))
    sys.path.insert(0, outdir)
    return importlib.import_module("formats_pb2")


def proto_message(pb, row):
    from google.protobuf import timestamp_pb2, wrappers_pb2
    ms, us = row["ts_ms"], row["ts_us"]
    msg = pb.Row(
        id=row["id"], name=row["name"], price=price_text(row["unscaled"]),
        ts=timestamp_pb2.Timestamp(seconds=ms // 1000, nanos=(ms % 1000) * 1000000),
        ts_us=timestamp_pb2.Timestamp(seconds=us // 1000000, nanos=(us % 1000000) * 1000),
        day=row["day"], uid=row["uid"], tags=row["tags"], attrs=row["attrs"], ok=row["ok"],
        kind=pb.Row.Kind.Value(row["kind"]), inner=pb.Row.Inner(city=row["city"], zip=row["zip"]),
    )
    if row["score"] is not None:
        msg.score.CopyFrom(wrappers_pb2.DoubleValue(value=row["score"]))
    return msg


# ---------------------------------------------------------------------------

def registry_client(a):
    from confluent_kafka.schema_registry import SchemaRegistryClient
    if not a.registry:
        sys.exit("--format %s needs --registry URL" % a.format)
    conf = {"url": a.registry}
    if a.registry_user:
        conf["basic.auth.user.info"] = a.registry_user
    if a.registry_ca:
        conf["ssl.ca.location"] = a.registry_ca
    return SchemaRegistryClient(conf)


def schema_id_of(value):
    if value and len(value) >= 5 and value[0] == 0:
        return struct.unpack(">I", value[1:5])[0]
    return None


def encode_all(a, rows, tmpdir):
    """[(value bytes, expected row)] for the chosen format."""
    fmt = a.format
    out = []
    if fmt == "avro":
        from confluent_kafka.schema_registry.avro import AvroSerializer
        from confluent_kafka.serialization import MessageField, SerializationContext
        client = registry_client(a)
        ctx = SerializationContext(a.topic, MessageField.VALUE)
        conf = {"auto.register.schemas": True}
        ser_v1 = AvroSerializer(client, json.dumps(avro_schema(v1=True)), conf=conf)
        ser_v2 = AvroSerializer(client, json.dumps(avro_schema()), conf=conf)
        half = len(rows) // 2
        for i, row in enumerate(rows):
            v1 = i < half
            ser = ser_v1 if v1 else ser_v2
            out.append((ser(avro_record(row, v1), ctx), expected_row(row, fmt, v1)))
    elif fmt == "avro-file":
        import fastavro
        schema = fastavro.parse_schema(avro_schema())
        for row in rows:
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, schema, avro_record(row))
            out.append((buf.getvalue(), expected_row(row, fmt)))
    elif fmt in ("protobuf", "protobuf-file"):
        pb = compile_proto(tmpdir)
        if fmt == "protobuf":
            from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
            from confluent_kafka.serialization import MessageField, SerializationContext
            ser = ProtobufSerializer(pb.Row, registry_client(a), {"use.deprecated.format": False})
            ctx = SerializationContext(a.topic, MessageField.VALUE)

            def enc(m):
                # The serializer's payload is m.SerializeToString(), whose
                # map order is upb's hash order; keep its framing (magic, id,
                # message indexes) and put the deterministic (key-sorted)
                # encoding of the same message after it.
                framed = ser(m, ctx)
                payload = m.SerializeToString(deterministic=True)
                header = framed[:len(framed) - len(payload)]
                assert header[:1] == b"\0" and len(header) >= 6, header
                return header + payload
        else:
            enc = lambda m: m.SerializeToString(deterministic=True)  # noqa: E731
        for row in rows:
            out.append((enc(proto_message(pb, row)), expected_row(row, fmt)))
    elif fmt == "csv":
        out = [(csv_line(r).encode("utf-8"), expected_row(r, fmt)) for r in rows]
    elif fmt == "tsv":
        out = [(tsv_line(r).encode("utf-8"), expected_row(r, fmt)) for r in rows]
    elif fmt == "raw":
        out = [(raw_text(r).encode("utf-8"), expected_row(r, fmt)) for r in rows]
    return out


def write_schema_out(a, tmpdir):
    if a.format in ("avro", "avro-file"):
        with open(a.schema_out, "w") as f:
            json.dump(avro_schema(), f, indent=2)
            f.write("\n")
    elif a.format in ("protobuf", "protobuf-file"):
        with open(os.path.join(tmpdir, "formats.desc"), "rb") as src, open(a.schema_out, "wb") as dst:
            dst.write(src.read())
    else:
        sys.exit("--schema-out applies to avro, avro-file, protobuf and protobuf-file")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokers", default="127.0.0.1:9092")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--format", required=True, choices=FORMATS)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--registry", metavar="URL", help="Schema Registry URL (avro, protobuf)")
    ap.add_argument("--registry-user", metavar="U:P", help="basic auth for the registry")
    ap.add_argument("--registry-ca", metavar="FILE", help="CA file to verify an https registry")
    ap.add_argument("--expected", metavar="FILE", help="write the expected table rows as JSONEachRow")
    ap.add_argument("--schema-out", metavar="FILE", help="avro*: the .avsc; protobuf*: a FileDescriptorSet")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--partitions", type=int, default=1, help="partitions if the topic is created (default 1)")
    a = ap.parse_args()
    if a.count < 0:
        ap.error("--count must be >= 0")

    rows = gen_rows(a.count, a.seed)
    with tempfile.TemporaryDirectory(prefix="produce_formats_") as tmpdir:
        encoded = encode_all(a, rows, tmpdir)
        if a.schema_out:
            write_schema_out(a, tmpdir)

    if a.expected:
        with open(a.expected, "w", encoding="utf-8") as f:
            for _, exp in encoded:
                f.write(json.dumps(exp, ensure_ascii=False, separators=(",", ":")) + "\n")

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from produce import ensure_topic, send_all
    ensure_topic(a.brokers, a.topic, a.partitions)
    delivered, failed, left = send_all(
        a.brokers, a.topic, ((str(row["id"]).encode(), value) for row, (value, _) in zip(rows, encoded)))

    ids = sorted({i for i in (schema_id_of(v) for v, _ in encoded) if i is not None}) \
        if a.format in ("avro", "protobuf") else []
    print(json.dumps({"topic": a.topic, "format": a.format, "delivered": delivered, "count": len(encoded),
                      "schema_ids": ids}), flush=True)
    if failed or left:
        sys.exit("failed: %d errors (first: %s), %d undelivered" % (len(failed), failed[0] if failed else None, left))


if __name__ == "__main__":
    main()
