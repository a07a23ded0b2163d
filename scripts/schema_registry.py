#!/usr/bin/env python3
"""A small in-memory Confluent-compatible Schema Registry for tests.

Usage:
  schema_registry.py [--host 127.0.0.1] [--port 0] [--user USER:PASS]
                     [--tls-cert FILE --tls-key FILE] [--ready-file FILE]
                     [--first-id N] [--verbose]
  schema_registry.py make-cert DIR [--with openssl|cryptography]

Serving: prints one line `ready <url>` on stdout (flushed) once listening, and
writes the URL to --ready-file (atomically) if given. --port 0 picks a free
port. --user requires HTTP basic auth on every non-admin request (401
{"error_code":401,...} otherwise). --tls-cert/--tls-key serve https. Schemas
live in memory only; ids start at --first-id (default 1) and are global: the
same schema text + type + references gets the same id in every subject.

Confluent REST API subset (what confluent-kafka's SchemaRegistryClient and
serializers use, plus the usual read endpoints):
  POST   /subjects/{s}/versions            register -> {"id"}
  POST   /subjects/{s}                     lookup -> {"subject","id","version","schema",...}
  GET    /schemas/ids/{id}                 {"schema", "schemaType" (not for AVRO), "references" (when any)}
  GET    /schemas/ids/{id}/versions        [{"subject","version"}]
  GET    /schemas/ids/{id}/subjects        ["s", ...]
  GET    /schemas/types                    ["AVRO","JSON","PROTOBUF"]
  GET    /subjects                         ["s", ...]
  GET    /subjects/{s}/versions            [1, 2, ...]
  GET    /subjects/{s}/versions/{v|latest|-1}         {"subject","id","version","schema","schemaType","references"}
  GET    /subjects/{s}/versions/{v|latest}/schema     the schema text alone
  DELETE /subjects/{s}                     [versions]   (ids stay readable, as after a soft delete)
  DELETE /subjects/{s}/versions/{v}        v
  GET/PUT /config, /config/{s}             {"compatibilityLevel":"NONE"} / echo {"compatibility": X}
  GET/PUT /mode, /mode/{s}                 {"mode":"READWRITE"} / echo
  GET    /associations/resources/{ns}/{topic}   [] (confluent-kafka 2.16 asks this
                                           before falling back to TopicNameStrategy)
Errors have Confluent's shape: 404 {"error_code":40401 subject, 40402 version,
40403 schema not found}, 422 {"error_code":42201 invalid schema, 42202 invalid
version}, 401 unauthorized, 404 {"error_code":404} unknown endpoint.

Protobuf: confluent-kafka's ProtobufSerializer registers a base64-encoded
FileDescriptorProto. A real registry parses it and serves .proto text; this one
does the same (rendering the descriptor as proto text, which needs the
`protobuf` package; without it the base64 text is kept). `?format=serialized`
on GET /schemas/ids/{id} and the subject/version reads answers the base64
FileDescriptorProto (for schemas registered as text, compiled with grpc_tools
when installed), as the Python ProtobufDeserializer asks for.

Test hooks (never counted, never failed, never need auth):
  POST /_admin/fail {"status":503,"count":N,"delay_ms":0}
       the next N non-admin requests wait delay_ms, then answer `status`
       (status 0 or absent: only delayed, then served normally)
  GET  /_admin/stats -> {"requests": {path: count}, "calls": {"METHOD path": count}, "total": n}
       counting non-admin requests (query strings left out), so tests can
       assert that a client caches schemas by id
  POST /_admin/reset  clears the stats and pending failures (not the schemas)
"""
import argparse
import base64
import binascii
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class ApiError(Exception):
    def __init__(self, status, code, message):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def subject_not_found(subject):
    return ApiError(404, 40401, "Subject '%s' not found." % subject)


def version_not_found(version):
    return ApiError(404, 40402, "Version %s not found." % version)


def schema_not_found():
    return ApiError(404, 40403, "Schema not found")


# ---------------------------------------------------------------------------
# Protobuf: base64 FileDescriptorProto <-> .proto text

def _protobuf():
    try:
        from google.protobuf import descriptor_pb2
        return descriptor_pb2
    except ImportError:
        return None


def decode_descriptor(text):
    """A FileDescriptorProto if `text` is one in base64, else None."""
    pb = _protobuf()
    if pb is None or not text or not re.fullmatch(r"[A-Za-z0-9+/=\s]+", text):
        return None
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
        fd = pb.FileDescriptorProto.FromString(raw)
    except (binascii.Error, ValueError, Exception):  # DecodeError is not a ValueError everywhere
        return None
    if not (fd.name or fd.message_type or fd.enum_type or fd.package):
        return None
    return fd


_SCALARS = {
    1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 6: "fixed64",
    7: "fixed32", 8: "bool", 9: "string", 12: "bytes", 13: "uint32",
    15: "sfixed32", 16: "sfixed64", 17: "sint32", 18: "sint64",
}
_TYPE_GROUP, _TYPE_MESSAGE, _TYPE_ENUM = 10, 11, 14
_LABEL_OPTIONAL, _LABEL_REQUIRED, _LABEL_REPEATED = 1, 2, 3


def _quote(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _field_type(f):
    if f.type in (_TYPE_MESSAGE, _TYPE_ENUM, _TYPE_GROUP):
        return f.type_name  # fully qualified, with its leading dot
    return _SCALARS[f.type]


def _field_options(f):
    opts = []
    if f.HasField("default_value"):
        if f.type == 9 or f.type == 12:
            opts.append("default = " + _quote(f.default_value))
        else:
            opts.append("default = " + f.default_value)
    if f.options.HasField("packed"):
        opts.append("packed = " + ("true" if f.options.packed else "false"))
    if f.options.deprecated:
        opts.append("deprecated = true")
    return (" [" + ", ".join(opts) + "]") if opts else ""


def _reserved(out, pad, ranges, names, inclusive_end):
    parts = []
    for r in ranges:
        end = r.end if inclusive_end else r.end - 1
        if end == r.start:
            parts.append(str(r.start))
        elif end >= 536870911 and not inclusive_end:
            parts.append("%d to max" % r.start)
        else:
            parts.append("%d to %d" % (r.start, end))
    if parts:
        out.append("%sreserved %s;" % (pad, ", ".join(parts)))
    if names:
        out.append("%sreserved %s;" % (pad, ", ".join(_quote(n) for n in names)))


def _render_enum(out, e, depth):
    pad = "  " * depth
    out.append("%senum %s {" % (pad, e.name))
    if e.options.allow_alias:
        out.append("%s  option allow_alias = true;" % pad)
    for v in e.value:
        dep = " [deprecated = true]" if v.options.deprecated else ""
        out.append("%s  %s = %d%s;" % (pad, v.name, v.number, dep))
    _reserved(out, pad + "  ", e.reserved_range, e.reserved_name, True)
    out.append("%s}" % pad)


def _render_message(out, m, depth, syntax):
    pad = "  " * depth
    inner = pad + "  "
    out.append("%smessage %s {" % (pad, m.name))
    entries = {n.name: n for n in m.nested_type if n.options.map_entry}
    real_oneofs = {}
    for f in m.field:
        if f.HasField("oneof_index") and not f.proto3_optional:
            real_oneofs.setdefault(f.oneof_index, []).append(f)
    emitted_oneofs = set()

    def field_line(f, pad_):
        opts = _field_options(f)
        if f.label == _LABEL_REPEATED and f.type == _TYPE_MESSAGE:
            entry_name = f.type_name.rsplit(".", 1)[-1]
            entry = entries.get(entry_name)
            if entry is not None:
                k = next(x for x in entry.field if x.number == 1)
                v = next(x for x in entry.field if x.number == 2)
                return "%smap<%s, %s> %s = %d%s;" % (pad_, _field_type(k), _field_type(v), f.name, f.number, opts)
        label = ""
        if f.label == _LABEL_REPEATED:
            label = "repeated "
        elif f.label == _LABEL_REQUIRED:
            label = "required "
        elif f.proto3_optional or (syntax == "proto2" and not f.HasField("oneof_index")):
            label = "optional "
        return "%s%s%s %s = %d%s;" % (pad_, label, _field_type(f), f.name, f.number, opts)

    for f in m.field:
        if f.HasField("oneof_index") and not f.proto3_optional:
            idx = f.oneof_index
            if idx in emitted_oneofs:
                continue
            emitted_oneofs.add(idx)
            out.append("%soneof %s {" % (inner, m.oneof_decl[idx].name))
            for g in real_oneofs[idx]:
                out.append(field_line(g, inner + "  "))
            out.append("%s}" % inner)
        else:
            out.append(field_line(f, inner))
    for e in m.enum_type:
        _render_enum(out, e, depth + 1)
    for n in m.nested_type:
        if not n.options.map_entry:
            _render_message(out, n, depth + 1, syntax)
    _reserved(out, inner, m.reserved_range, m.reserved_name, False)
    out.append("%s}" % pad)


def render_proto(fd):
    """.proto text for a FileDescriptorProto (messages, enums, services)."""
    syntax = fd.syntax or "proto2"
    out = ['syntax = "%s";' % syntax]
    if fd.package:
        out.append("package %s;" % fd.package)
    public = set(fd.public_dependency)
    weak = set(fd.weak_dependency)
    for i, dep in enumerate(fd.dependency):
        kind = "public " if i in public else "weak " if i in weak else ""
        out.append("import %s%s;" % (kind, _quote(dep)))
    for name in ("java_package", "java_outer_classname", "go_package", "csharp_namespace", "objc_class_prefix"):
        if fd.options.HasField(name):
            out.append("option %s = %s;" % (name, _quote(getattr(fd.options, name))))
    if fd.options.HasField("java_multiple_files"):
        out.append("option java_multiple_files = %s;" % ("true" if fd.options.java_multiple_files else "false"))
    out.append("")
    for m in fd.message_type:
        _render_message(out, m, 0, syntax)
    for e in fd.enum_type:
        _render_enum(out, e, 0)
    for s in fd.service:
        out.append("service %s {" % s.name)
        for r in s.method:
            out.append("  rpc %s (%s%s) returns (%s%s);" % (
                r.name, "stream " if r.client_streaming else "", r.input_type,
                "stream " if r.server_streaming else "", r.output_type))
        out.append("}")
    return "\n".join(out) + "\n"


def compile_proto_text(files, main_name):
    """Base64 FileDescriptorProto of `main_name` compiled from {name: text}
    with grpc_tools' protoc; None when grpc_tools is not installed."""
    try:
        from grpc_tools import protoc
        import importlib.resources
        include = str(importlib.resources.files("grpc_tools") / "_proto")
    except ImportError:
        return None
    pb = _protobuf()
    with tempfile.TemporaryDirectory(prefix="schema_registry_") as d:
        for name, text in files.items():
            path = os.path.join(d, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        out = os.path.join(d, "out.pb")
        rc = protoc.main(["protoc", "-I" + d, "-I" + include, "--descriptor_set_out=" + out, main_name])
        if rc != 0:
            raise ApiError(422, 42201, "Invalid schema: protoc failed")
        fds = pb.FileDescriptorSet.FromString(open(out, "rb").read())
        return base64.b64encode(fds.file[-1].SerializeToString()).decode("ascii")


# ---------------------------------------------------------------------------
# Store


def schema_of(body):
    """The schema text, its type and its references from a request body."""
    text = body.get("schema")
    if not isinstance(text, str):
        raise ApiError(422, 42201, "Invalid schema: 'schema' must be a string")
    return text, (body.get("schemaType") or "AVRO").upper(), body.get("references") or []

class Store:
    def __init__(self, first_id=1):
        self.lock = threading.RLock()
        self.next_id = first_id
        self.by_key = {}      # (type, canonical, refs) -> id
        self.schemas = {}     # id -> {"schema","schemaType","references","serialized"}
        self.subjects = {}    # subject -> {version: id}
        self.config = {}      # None (global) / subject -> level
        self.mode = {}

    @staticmethod
    def _refs_key(refs):
        return tuple((r.get("name"), r.get("subject"), int(r.get("version", 0))) for r in refs)

    def _canonical(self, text, stype):
        """(stored text, dedupe key, serialized-descriptor or None)"""
        if stype in ("AVRO", "JSON"):
            try:
                parsed = json.loads(text)
            except ValueError as e:
                raise ApiError(422, 42201, "Invalid schema: %s" % e)
            return text, json.dumps(parsed, sort_keys=True, separators=(",", ":")), None
        if stype == "PROTOBUF":
            fd = decode_descriptor(text)
            if fd is not None:
                rendered = render_proto(fd)
                return rendered, rendered, base64.b64encode(fd.SerializeToString()).decode("ascii")
            return text, text, None
        raise ApiError(422, 42201, "Invalid schema type %s" % stype)

    def register(self, subject, body):
        text, stype, refs = schema_of(body)
        with self.lock:
            for r in refs:
                self._check_ref(r)
            stored, canon, serialized = self._canonical(text, stype)
            key = (stype, canon, self._refs_key(refs))
            sid = self.by_key.get(key)
            if sid is None:
                sid = self.next_id
                self.next_id += 1
                self.by_key[key] = sid
                self.schemas[sid] = {"schema": stored, "schemaType": stype,
                                     "references": [dict(r) for r in refs], "serialized": serialized}
            versions = self.subjects.setdefault(subject, {})
            for v, i in versions.items():
                if i == sid:
                    return sid, v
            v = max(versions, default=0) + 1
            versions[v] = sid
            return sid, v

    def _check_ref(self, r):
        if not isinstance(r, dict) or not all(k in r for k in ("name", "subject", "version")):
            raise ApiError(422, 42201, "Invalid schema: reference needs name, subject and version")
        versions = self.subjects.get(r["subject"])
        if not versions or int(r["version"]) not in versions:
            raise ApiError(422, 42201, "Invalid schema: reference %s (subject %s version %s) not found"
                           % (r["name"], r["subject"], r["version"]))

    def lookup(self, subject, body):
        text, stype, refs = schema_of(body)
        with self.lock:
            versions = self.subjects.get(subject)
            if not versions:
                raise subject_not_found(subject)
            _, canon, _ = self._canonical(text, stype)
            sid = self.by_key.get((stype, canon, self._refs_key(refs)))
            for v, i in sorted(versions.items()):
                if i == sid:
                    return self.version_doc(subject, v)
            raise schema_not_found()

    def schema_doc(self, sid, fmt=None):
        with self.lock:
            s = self.schemas.get(sid)
            if s is None:
                raise schema_not_found()
            doc = {"schema": self._text(sid, fmt)}
            if s["schemaType"] != "AVRO":
                doc["schemaType"] = s["schemaType"]
            if s["references"]:
                doc["references"] = s["references"]
            return doc

    def _text(self, sid, fmt):
        s = self.schemas[sid]
        if fmt == "serialized" and s["schemaType"] == "PROTOBUF":
            if s["serialized"] is None:
                files = {}
                self._collect_ref_texts(s["references"], files)
                files["__schema_%d.proto" % sid] = s["schema"]
                s["serialized"] = compile_proto_text(files, "__schema_%d.proto" % sid)
            if s["serialized"] is not None:
                return s["serialized"]
        return s["schema"]

    def _collect_ref_texts(self, refs, files):
        for r in refs:
            rid = self.subjects[r["subject"]][int(r["version"])]
            rs = self.schemas[rid]
            self._collect_ref_texts(rs["references"], files)
            files[r["name"]] = rs["schema"]

    def resolve_version(self, subject, version):
        versions = self.subjects.get(subject)
        if not versions:
            raise subject_not_found(subject)
        if version in ("latest", "-1"):
            return max(versions)
        try:
            v = int(version)
        except ValueError:
            raise ApiError(422, 42202, "The specified version '%s' is not a valid version id. Allowed values are "
                                       "between [1, 2^31-1] and the string \"latest\"" % version)
        if v not in versions:
            raise version_not_found(version)
        return v

    def version_doc(self, subject, version, fmt=None):
        with self.lock:
            v = self.resolve_version(subject, str(version))
            sid = self.subjects[subject][v]
            s = self.schemas[sid]
            return {"subject": subject, "id": sid, "version": v, "schema": self._text(sid, fmt),
                    "schemaType": s["schemaType"], "references": s["references"]}

    def id_versions(self, sid):
        with self.lock:
            if sid not in self.schemas:
                raise schema_not_found()
            return [{"subject": subj, "version": v}
                    for subj in sorted(self.subjects) for v, i in sorted(self.subjects[subj].items()) if i == sid]

    def delete_subject(self, subject):
        with self.lock:
            versions = self.subjects.pop(subject, None)
            if not versions:
                raise subject_not_found(subject)
            return sorted(versions)

    def delete_version(self, subject, version):
        with self.lock:
            v = self.resolve_version(subject, version)
            del self.subjects[subject][v]
            if not self.subjects[subject]:
                del self.subjects[subject]
            return v


# ---------------------------------------------------------------------------
# HTTP

class Hooks:
    def __init__(self):
        self.lock = threading.Lock()
        self.fail_status = 0
        self.fail_count = 0
        self.delay_ms = 0
        self.requests = {}
        self.calls = {}

    def count(self, method, path):
        with self.lock:
            self.requests[path] = self.requests.get(path, 0) + 1
            call = "%s %s" % (method, path)
            self.calls[call] = self.calls.get(call, 0) + 1

    def take_failure(self):
        """(status, delay_ms) for this request, consuming one of the count."""
        with self.lock:
            if self.fail_count <= 0:
                return 0, 0
            self.fail_count -= 1
            return self.fail_status, self.delay_ms

    def reset(self):
        with self.lock:
            self.fail_count = 0
            self.requests = {}
            self.calls = {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "chbridge-test-schema-registry/1"

    # set on the class by make_server
    store = None
    hooks = None
    auth = None
    verbose = False

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write("schema_registry: %s - %s\n" % (self.address_string(), fmt % args))

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _send(self, status, payload, content_type=CONTENT_TYPE, extra_headers=()):
        if isinstance(payload, (bytes, bytearray)):
            body = bytes(payload)
        elif isinstance(payload, str) and content_type.startswith("text/"):
            body = payload.encode("utf-8")
        else:
            body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra_headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status, code, message, extra_headers=()):
        self._send(status, {"error_code": code, "message": message}, extra_headers=extra_headers)

    def _read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _authorized(self):
        if self.auth is None:
            return True
        h = self.headers.get("Authorization") or ""
        if not h.lower().startswith("basic "):
            return False
        try:
            got = base64.b64decode(h[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return got == self.auth

    def _dispatch(self, method):
        raw = self._read_body()  # always, so the keep-alive stream stays in step
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            if path.startswith("/_admin/") or path == "/_admin":
                return self._admin(method, path, raw)
            self.hooks.count(method, path)
            if not self._authorized():
                return self._error(401, 401, "Unauthorized",
                                   extra_headers=[("WWW-Authenticate", 'Basic realm="schema-registry"')])
            status, delay = self.hooks.take_failure()
            if delay:
                time.sleep(delay / 1000.0)
            if status:
                return self._error(status, status, "Injected failure (HTTP %d)" % status)
            body = None
            if raw:
                try:
                    body = json.loads(raw.decode("utf-8"))
                except ValueError:
                    return self._error(400, 400, "Malformed JSON body")
            result = self._route(method, path, query, body)
            if isinstance(result, tuple):
                self._send(200, result[0], content_type=result[1])
            else:
                self._send(200, result)
        except ApiError as e:
            self._error(e.status, e.code, e.message)
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as e:  # a bug here must not hang the client
            self._error(500, 50001, "Internal error: %r" % e)

    def _admin(self, method, path, raw):
        body = json.loads(raw.decode("utf-8")) if raw else {}
        h = self.hooks
        if method == "POST" and path == "/_admin/fail":
            with h.lock:
                h.fail_status = int(body.get("status") or 0)
                h.fail_count = int(body.get("count", 1))
                h.delay_ms = int(body.get("delay_ms") or 0)
            return self._send(200, {"status": h.fail_status, "count": h.fail_count, "delay_ms": h.delay_ms})
        if method == "GET" and path == "/_admin/stats":
            with h.lock:
                return self._send(200, {"requests": dict(h.requests), "calls": dict(h.calls),
                                        "total": sum(h.requests.values()),
                                        "pending_failures": h.fail_count})
        if method == "POST" and path == "/_admin/reset":
            h.reset()
            return self._send(200, {})
        return self._error(404, 404, "HTTP 404 Not Found")

    def _route(self, method, path, query, body):
        st = self.store
        seg = [unquote(s) for s in path.strip("/").split("/")] if path != "/" else []
        fmt = query.get("format")
        n = len(seg)

        if n == 0 and method == "GET":
            return {}
        if seg[0] == "schemas":
            if n == 2 and seg[1] == "types" and method == "GET":
                return ["AVRO", "JSON", "PROTOBUF"]
            if n >= 3 and seg[1] == "ids" and method == "GET":
                try:
                    sid = int(seg[2])
                except ValueError:
                    raise schema_not_found()
                if n == 3:
                    return st.schema_doc(sid, fmt)
                if n == 4 and seg[3] == "versions":
                    return st.id_versions(sid)
                if n == 4 and seg[3] == "subjects":
                    return sorted({d["subject"] for d in st.id_versions(sid)})
                if n == 4 and seg[3] == "schema":
                    return (st.schema_doc(sid, fmt)["schema"], "text/plain; charset=utf-8")
        elif seg[0] == "subjects":
            if n == 1 and method == "GET":
                with st.lock:
                    return sorted(st.subjects)
            subject = seg[1] if n >= 2 else None
            if n == 2 and method == "POST":
                return st.lookup(subject, body or {})
            if n == 2 and method == "DELETE":
                return st.delete_subject(subject)
            if n == 3 and seg[2] == "versions":
                if method == "POST":
                    sid, _ = st.register(subject, body or {})
                    return {"id": sid}
                if method == "GET":
                    with st.lock:
                        versions = st.subjects.get(subject)
                        if not versions:
                            raise subject_not_found(subject)
                        return sorted(versions)
            if n == 4 and seg[2] == "versions":
                if method == "GET":
                    return st.version_doc(subject, seg[3], fmt)
                if method == "DELETE":
                    return st.delete_version(subject, seg[3])
            if n == 5 and seg[2] == "versions" and seg[4] == "schema" and method == "GET":
                return (st.version_doc(subject, seg[3], fmt)["schema"], "text/plain; charset=utf-8")
            if n == 5 and seg[2] == "versions" and seg[4] == "referencedby" and method == "GET":
                doc = st.version_doc(subject, seg[3])
                with st.lock:
                    return sorted(sid for sid, s in st.schemas.items()
                                  if any(r["subject"] == subject and int(r["version"]) == doc["version"]
                                         for r in s["references"]))
        elif seg[0] in ("config", "mode") and n in (1, 2):
            table = st.config if seg[0] == "config" else st.mode
            key = seg[1] if n == 2 else None
            if seg[0] == "config":
                field_in, field_out, default = "compatibility", "compatibilityLevel", "NONE"
            else:
                field_in, field_out, default = "mode", "mode", "READWRITE"
            if method == "GET":
                with st.lock:
                    return {field_out: table.get(key, table.get(None, default))}
            if method == "PUT":
                value = (body or {}).get(field_in) or (body or {}).get(field_out)
                if not isinstance(value, str):
                    raise ApiError(422, 42203 if seg[0] == "config" else 42204, "Invalid %s" % field_in)
                with st.lock:
                    table[key] = value.upper()
                return {field_in: value.upper()}
            if method == "DELETE" and key is not None:
                with st.lock:
                    old = table.pop(key, None)
                return {field_out: old or default}
        elif seg[0] == "associations" and n == 4 and seg[1] == "resources" and method == "GET":
            # confluent-kafka >= 2.13 asks this first (subject name strategy
            # "ASSOCIATED"); none here, so it falls back to TopicNameStrategy.
            return []
        elif seg[0] == "contexts" and n == 1 and method == "GET":
            return ["."]
        raise ApiError(404, 404, "HTTP 404 Not Found")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    tls_context = None

    def finish_request(self, request, client_address):
        # TLS handshake in the worker thread, so one silent client cannot
        # block accept() for everybody.
        if self.tls_context is not None:
            try:
                request = self.tls_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return
        super().finish_request(request, client_address)


def make_server(host, port, store, hooks, auth=None, tls_cert=None, tls_key=None, verbose=False):
    handler = type("BoundHandler", (Handler,), {"store": store, "hooks": hooks, "auth": auth, "verbose": verbose})
    cls = Server
    if ":" in host:
        cls = type("Server6", (Server,), {"address_family": socket.AF_INET6})
    srv = cls((host, port), handler)
    scheme = "http"
    if tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls_cert, tls_key)
        srv.tls_context = ctx
        scheme = "https"
    h = "[%s]" % host if ":" in host else host
    url = "%s://%s:%d" % (scheme, h, srv.server_address[1])
    return srv, url


# ---------------------------------------------------------------------------
# make-cert

_OPENSSL_CNF = """
[req]
distinguished_name = dn
prompt = no
[dn]
CN = %(cn)s
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_srv]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,IP:::1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _make_cert_openssl(outdir):
    with tempfile.TemporaryDirectory(prefix="mkcert_") as d:
        def cnf(cn):
            p = os.path.join(d, "%s.cnf" % cn.replace(" ", "_"))
            with open(p, "w") as f:
                f.write(_OPENSSL_CNF % {"cn": cn})
            return p

        def run(*args):
            subprocess.run(["openssl"] + list(args), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        ca_key, ca_cnf = os.path.join(d, "ca.key"), cnf("chbridge test CA")
        srv_key, srv_cnf = os.path.join(d, "server.key"), cnf("127.0.0.1")
        csr = os.path.join(d, "server.csr")
        ca_pem, srv_pem = os.path.join(d, "ca.pem"), os.path.join(d, "server.pem")
        for key in (ca_key, srv_key):
            run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
        run("req", "-x509", "-new", "-config", ca_cnf, "-extensions", "v3_ca", "-key", ca_key,
            "-sha256", "-days", "3650", "-set_serial", "1", "-out", ca_pem)
        run("req", "-new", "-config", srv_cnf, "-key", srv_key, "-out", csr)
        run("x509", "-req", "-in", csr, "-CA", ca_pem, "-CAkey", ca_key, "-set_serial", "2",
            "-days", "3650", "-sha256", "-extfile", srv_cnf, "-extensions", "v3_srv", "-out", srv_pem)
        for name in ("ca.pem", "server.pem", "server.key", "ca.key"):
            shutil.copyfile(os.path.join(d, name), os.path.join(outdir, name))


def _make_cert_cryptography(outdir):
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    later = now + datetime.timedelta(days=3650)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chbridge test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now).not_valid_after(later)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now).not_valid_after(later)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1")),
                x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    files = {"ca.pem": ca.public_bytes(pem), "server.pem": cert.public_bytes(pem),
             "server.key": key.private_bytes(pem, pkcs8, none), "ca.key": ca_key.private_bytes(pem, pkcs8, none)}
    for name, data in files.items():
        with open(os.path.join(outdir, name), "wb") as f:
            f.write(data)


def make_cert(argv):
    ap = argparse.ArgumentParser(prog="schema_registry.py make-cert",
                                 description="Write DIR/ca.pem, DIR/server.pem, DIR/server.key (and DIR/ca.key): "
                                             "a throwaway CA and an EC P-256 server certificate for 127.0.0.1, "
                                             "::1 and localhost, valid 10 years.")
    ap.add_argument("dir")
    ap.add_argument("--with", dest="tool", choices=["openssl", "cryptography"],
                    help="default: the openssl CLI when on PATH, else the cryptography package")
    a = ap.parse_args(argv)
    os.makedirs(a.dir, exist_ok=True)
    tool = a.tool or ("openssl" if shutil.which("openssl") else "cryptography")
    if tool == "openssl":
        try:
            _make_cert_openssl(a.dir)
        except subprocess.CalledProcessError as e:
            sys.exit("make-cert: %s failed: %s" % (" ".join(e.cmd[:2]), (e.stderr or b"").decode(errors="replace")))
    else:
        _make_cert_cryptography(a.dir)
    os.chmod(os.path.join(a.dir, "server.key"), 0o600)
    os.chmod(os.path.join(a.dir, "ca.key"), 0o600)
    print("wrote %s/{ca.pem,server.pem,server.key,ca.key} with %s" % (a.dir, tool))


# ---------------------------------------------------------------------------

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["make-cert"]:
        return make_cert(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Subcommand: make-cert DIR [--with openssl|cryptography]")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = a free port (default)")
    ap.add_argument("--user", metavar="USER:PASS", help="require HTTP basic auth")
    ap.add_argument("--tls-cert", metavar="FILE")
    ap.add_argument("--tls-key", metavar="FILE")
    ap.add_argument("--ready-file", metavar="FILE", help="write the URL here once listening")
    ap.add_argument("--first-id", type=int, default=1, help="first schema id (default 1)")
    ap.add_argument("--verbose", action="store_true", help="log every request to stderr")
    a = ap.parse_args(argv)
    if bool(a.tls_cert) != bool(a.tls_key):
        ap.error("--tls-cert and --tls-key go together")
    if a.user is not None and ":" not in a.user:
        ap.error("--user must be USER:PASS")

    def on_term(_signum, _frame):
        raise KeyboardInterrupt

    # Installed before readiness is announced, so a SIGTERM right after the
    # announcement still exits cleanly (status 0).
    signal.signal(signal.SIGTERM, on_term)
    srv, url = make_server(a.host, a.port, Store(a.first_id), Hooks(), a.user, a.tls_cert, a.tls_key, a.verbose)
    try:
        if a.ready_file:
            tmp = a.ready_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(url + "\n")
            os.replace(tmp, a.ready_file)
        print("ready %s" % url, flush=True)
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()

if __name__ == "__main__":
    main()
