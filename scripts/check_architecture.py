#!/usr/bin/env python3
"""Every code path ARCHITECTURE.md names in backticks must exist in the code.

Usage: scripts/check_architecture.py [ARCHITECTURE.md]   (part of `make lint`)

A backticked token is taken for a code path when it looks like one:
- a file or folder (`kafka/offsets.rs`, `src/pipeline/`, `tests/it/drift.rs`):
  it must exist, under src/ or from the repository root;
- a path with `::` (`Core::on_record`, `drift::History`, `SinkEvent::Stale`):
  its last name must be defined in what the name before it is (a type's
  impl blocks, an enum's variants, a module's file), and that one must exist;
- a CamelCase name (`OffsetTracker`) or a SCREAMING_CASE one (`SINK_QUEUE`):
  it must be a type, trait, variant, const or static defined in src/.
Config keys (`batch.max_wait`), settings, SQL and prose in backticks are
left alone. Names that are not chbridge's own (crates' and ClickHouse's)
are listed in EXTERNAL below. Exit status 1 with one line per dangling name.
"""
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(REPO, "src")

# Names from dependencies, ClickHouse and Kafka that ARCHITECTURE.md mentions.
EXTERNAL = {
    "BaseConsumer", "ThreadedProducer", "Bytes", "RowBinaryWithDefaults", "RowBinary",
    "Native", "JSONEachRow", "ReplacingMergeTree", "MergeTree", "DeserializeSeed", "Visitor",
    "RawValue", "Mutex", "DynamicMessage", "CancellationToken", "Row", "TokioIo", "Full",
    "ClientConfig", "TopicPartitionList", "LowCardinality", "DateTime64", "Nullable", "Array",
    "String", "UInt64", "Float64", "Bool", "SIGTERM", "SIGINT", "SIGHUP", "SIGSTOP", "SIGCONT",
    "LeaveGroup", "OffsetFetch", "DescribeGroups", "ListOffsets", "Replicated", "ReplicatedMergeTree",
    "KeeperMap", "Distributed", "CommitRequest", "Send", "Sync", "Vec", "Option", "Result",
    "M_MMAP_THRESHOLD", "RUST_LOG", "T_0", "T_1", "ALTER", "INSERT", "UInt8", "Int32",
    "Nested", "Tuple", "Map", "Decimal", "Enum8", "Enum16", "JSON", "Variant", "Dynamic",
}

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def rust_files():
    for root, _, files in os.walk(SRC):
        for f in files:
            if f.endswith(".rs"):
                yield os.path.join(root, f)


def strip_literals(text):
    """The code without comments and without the insides of string and char
    literals (whose braces would throw the brace count off); lines kept."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i)
            j = n if j < 0 else j + 2
            out.append("\n" * text.count("\n", i, j))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + len(hashes) + 2)
            end = n if end < 0 else end + 1 + len(hashes)
            out.append('""' + "\n" * text.count("\n", i, end))
            i = end
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""' + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == "'" and re.match(r"'(\\.[^']*|[^'\\])'", text[i:i + 12]):
            m = re.match(r"'(\\.[^']*|[^'\\])'", text[i:i + 12])
            out.append("' '")
            i += len(m.group(0))
        else:
            out.append(c)
            i += 1
    return "".join(out)


def module_name(path):
    rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
    if rel[-1] == "mod":
        rel = rel[:-1]
    return rel[-1] if rel else "crate"


class Index:
    """What src/ defines: items per module, members per type."""

    def __init__(self):
        self.items = {}      # name -> kinds
        self.members = {}    # type or module -> set of names defined in it
        self.modules = set()
        self.files = set()
        self.text = ""
        for path in rust_files():
            self.read(path)

    def add(self, owner, name, kind):
        self.items.setdefault(name, set()).add(kind)
        self.members.setdefault(owner, set()).add(name)

    def read(self, path):
        mod = module_name(path)
        self.modules.add(mod)
        raw = open(path, encoding="utf-8").read()
        self.text += raw
        text = strip_literals(raw)
        for m in re.finditer(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(%s)" % IDENT, text, re.M):
            self.modules.add(m.group(1))
            self.add(mod, m.group(1), "mod")
        item = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:async\s+|unsafe\s+|const\s+)*"
                          r"(fn|struct|enum|trait|type|const|static)\s+(%s)" % IDENT)
        impl = re.compile(r"^\s*impl(?:<[^{]*?>)?\s+(?:(%s)(?:<[^{]*?>)?\s+for\s+)?(?:[a-z_]+::)*(%s)"
                          % (IDENT, IDENT))
        enum_start = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?enum\s+(%s)" % IDENT)
        self.files.add(os.path.basename(path))
        depth, owner_stack, enum_name, enum_depth = 0, [], None, None
        struct_name, struct_depth = None, None
        struct_start = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?struct\s+(%s)[^;(]*\{\s*$" % IDENT)
        inline_mod = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(%s)\s*\{" % IDENT)
        for line in text.splitlines():
            code = line
            im = inline_mod.match(code)
            if im:
                owner_stack.append((im.group(1), depth))
            s = struct_start.match(code)
            if s:
                struct_name, struct_depth = s.group(1), depth
            elif struct_name is not None and depth == struct_depth + 1:
                f = re.match(r"^\s*(?:pub(?:\([^)]*\))?\s+)?(%s)\s*:" % IDENT, code)
                if f:
                    self.add(struct_name, f.group(1), "field")
            m = impl.match(code)
            if m:
                owner_stack.append((m.group(2), depth))
            e = enum_start.match(code)
            if e:
                enum_name, enum_depth = e.group(1), depth
            m = item.match(code)
            if m:
                kind, name = m.groups()
                owner = owner_stack[-1][0] if owner_stack else mod
                self.add(owner, name, kind)
                self.add(mod, name, kind)
            elif enum_name is not None and depth == enum_depth + 1:
                v = re.match(r"^\s*(%s)\s*(?:[({,]|$)" % IDENT, code)
                if v and v.group(1)[0].isupper():
                    self.add(enum_name, v.group(1), "variant")
            depth += code.count("{") - code.count("}")
            while owner_stack and depth <= owner_stack[-1][1]:
                owner_stack.pop()
            if enum_name is not None and depth <= enum_depth and "{" not in code:
                enum_name = None
            if struct_name is not None and depth <= struct_depth and not s:
                struct_name = None

    def defined(self, name):
        return name in self.items or name in self.modules


def code_paths(text):
    for m in re.finditer(r"`([^`\n]+)`", text):
        tok = m.group(1).strip()
        line = text.count("\n", 0, m.start()) + 1
        yield line, tok


def check(doc):
    index = Index()
    text = open(doc, encoding="utf-8").read()
    problems = []
    for line, tok in code_paths(text):
        bare = tok[:-2] if tok.endswith("()") else tok
        if re.fullmatch(r"[\w./-]+\.(rs|py|sh|md|toml|yml|json)|[\w./-]+/", bare):
            candidates = [os.path.join(SRC, bare), os.path.join(REPO, bare)]
            # A file named alone (`metrics.rs`, in the module map) is found anywhere under src/.
            found = any(os.path.exists(c) for c in candidates) or ("/" not in bare and bare in index.files)
            if not found:
                problems.append("line %d: `%s`: no such file or folder" % (line, tok))
            continue
        if re.fullmatch(r"%s(::%s)+" % (IDENT, IDENT), bare):
            parts = bare.split("::")
            if parts[0] in ("crate", "self", "super"):
                parts = parts[1:]
            for owner, name in zip(parts, parts[1:]):
                if owner in EXTERNAL or owner in ("std", "tokio", "rdkafka", "clickhouse", "serde", "reload"):
                    break
                if not index.defined(owner):
                    problems.append("line %d: `%s`: %s is not defined in src/" % (line, tok, owner))
                    break
                if name not in index.members.get(owner, ()):
                    problems.append("line %d: `%s`: %s has no %s" % (line, tok, owner, name))
                    break
            continue
        if re.fullmatch(r"[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+|[A-Z][a-z]{2,}[0-9]*|[A-Z][A-Z0-9_]{2,}", bare):
            screaming = re.fullmatch(r"[A-Z][A-Z0-9_]{2,}", bare)
            # Constants and environment variables: named anywhere in the code.
            if screaming and re.search(r"\b%s\b" % re.escape(bare), index.text):
                continue
            if bare not in EXTERNAL and not index.defined(bare):
                problems.append("line %d: `%s` is not defined in src/ (if it is not chbridge's own, "
                                "add it to EXTERNAL in scripts/check_architecture.py)" % (line, tok))
    return problems


def main():
    doc = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "ARCHITECTURE.md")
    problems = check(doc)
    for p in problems:
        print("%s: %s" % (os.path.relpath(doc, REPO), p))
    if problems:
        print("%d code paths in %s name nothing in src/" % (len(problems), os.path.relpath(doc, REPO)))
        sys.exit(1)


if __name__ == "__main__":
    main()
