"""Writes the seed corpus of the `decoders` fuzz target: valid records of
every route it fuzzes, each prefixed with the byte that selects the route
(0 JSON, 1 mapped JSON, 2 CSV, 3 TSV, 4 Avro, 5 Protobuf).

Usage: .venv/bin/python fuzz/seeds.py OUT_DIR   (needs fastavro, grpcio-tools, protobuf)
"""
import io
import json
import os
import subprocess
import sys
import tempfile

import fastavro

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "data")
AVSC = json.load(open(os.path.join(DATA, "decoders.avsc"), encoding="utf-8"))
PROTO = open(os.path.join(DATA, "decoders.proto"), encoding="utf-8").read()


def seeds():
    yield 0, b'{"id":1,"name":"a\\"b","price":"12.5","ts":"2024-01-31 12:00:00.123","tags":["x"],"attrs":{"k":1},"score":null,"kind":"a","v":42,"d":[1,null],"t":{"x":"-170141183460469231731687303715884105728","y":null}}'
    yield 0, b'{"id":18446744073709551615,"name":"","price":-0.0001,"ts":1700000000.5,"tags":[],"attrs":{},"score":1e300,"kind":2,"v":"s","d":"x","t":{"x":1}}'
    yield 1, b'{"id":1,"user":{"name":"u1"},"inner":{"city":"Oslo"},"price":"1.5","v":[1,2]}'
    yield 2, b'1,"a,""b",12.5,2024-01-31 12:00:00.123,"[""x""]","{""k"":1}",,a,Oslo,42,"[1,2]","[1,null]"'
    yield 3, b'1\ta\\tb\t12.5\t2024-01-31 12:00:00.123\t["x"]\t{"k":1}\t\\N\ta\tOslo\t7\tx\t[1,"y"]'
    rec = {
        "id": 1, "name": "n", "price": __import__("decimal").Decimal("12.5000"),
        "ts": 1_700_000_000_123, "tags": ["x", "y"], "attrs": {"k": 1}, "score": 2.5,
        "kind": "b", "inner": {"city": "Oslo"},
    }
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(AVSC), rec)
    yield 4, buf.getvalue()
    with tempfile.TemporaryDirectory() as d:
        open(os.path.join(d, "row.proto"), "w").write(PROTO)
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{d}", f"--python_out={d}", "row.proto"], check=True)
        sys.path.insert(0, d)
        import row_pb2  # noqa: E402

        m = row_pb2.Row(id=7, name="n", price="12.5", tags=["x"], kind=2)
        m.ts.seconds = 1_700_000_000
        m.attrs["k"] = 1
        m.score.value = 2.5
        m.inner.city = "Oslo"
        yield 5, m.SerializeToString()


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for i, (route, value) in enumerate(seeds()):
        with open(os.path.join(out, f"seed-{route}-{i}"), "wb") as f:
            f.write(bytes([route]) + value)


if __name__ == "__main__":
    main()
