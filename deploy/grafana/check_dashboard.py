#!/usr/bin/env python3
"""Check the Grafana dashboard against chbridge's metrics (standard library only).

Usage: python3 deploy/grafana/check_dashboard.py [DASHBOARD] [--metrics docs/metrics.md]
                                                  [--promtool PATH]

Checks that:
- every panel (rows and panels inside collapsed rows included) has a unique id and
  a title; every panel other than a row has a gridPos inside the 24-column grid, a
  data source reference, and targets whose `expr` is non-empty (with unique refIds);
- every metric an expression or a template variable names (chbridge_* and process_*)
  is documented in docs/metrics.md (read now, so the check follows the docs) or is
  one of NEW_METRICS below; `_bucket`, `_sum` and `_count` only on histograms;
- histogram_quantile() aggregates keep `le`;
- every $variable used is defined by the dashboard or is a Grafana built-in.
With --promtool, every expression (variables replaced by values) is also parsed by
`promtool check rules`, which catches PromQL syntax errors.

Exits 0 when everything holds, 1 with one line per problem otherwise.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DASHBOARD = os.path.join(HERE, "chbridge.json")
DEFAULT_METRICS_MD = os.path.join(HERE, "..", "..", "docs", "metrics.md")

# Metrics being added with the dashboard, before docs/metrics.md lists them.
# Name -> type. Once the docs have them, this list is redundant but harmless.
NEW_METRICS = {
    "chbridge_buffered_bytes_limit": "gauge",
    "chbridge_last_insert_timestamp_seconds": "gauge",
    "chbridge_build_info": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_cpu_seconds_total": "counter",
}

GRAFANA_BUILTINS = {
    "__rate_interval", "__interval", "__interval_ms", "__range", "__range_s",
    "__range_ms", "__from", "__to", "__dashboard", "__name", "__org", "__user",
    "__all",
}
# Values substituted for promtool; only the syntax matters.
BUILTIN_VALUES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h",
                  "__range_s": "3600", "__range_ms": "3600000", "__interval_ms": "60000"}

METRIC_RE = re.compile(r"\b((?:chbridge|process)_[a-z0-9_]*[a-z0-9])\b")
VAR_RE = re.compile(r"\$(?:\{([A-Za-z0-9_]+)(?::[a-z]+)?\}|([A-Za-z0-9_]+))")
# A documented metric: a table row whose first cell is `name`; the type is the second cell.
DOC_ROW_RE = re.compile(r"^\|\s*`((?:chbridge|process)_[a-z0-9_]+)`\s*\|\s*([a-z]+)\s*\|")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def documented_metrics(path):
    metrics = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = DOC_ROW_RE.match(line.strip())
            if m:
                metrics[m.group(1)] = m.group(2)
    return metrics


def resolve_metric(name, known):
    """The known metric `name` refers to, or None."""
    if name in known:
        return name
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            if known.get(base) in ("histogram", "summary"):
                return base
    return None


def all_panels(panels):
    for p in panels:
        yield p
        # Collapsed rows keep their panels inside.
        yield from all_panels(p.get("panels") or [])


def check(dashboard, known):
    problems = []
    defined_vars = {v.get("name") for v in dashboard.get("templating", {}).get("list", [])}
    exprs = []  # (where, expr)

    seen_ids = {}
    panels = list(all_panels(dashboard.get("panels", [])))
    if not panels:
        problems.append("the dashboard has no panels")
    for p in panels:
        pid = p.get("id")
        title = (p.get("title") or "").strip()
        where = "panel %r (id %s)" % (title or "<untitled>", pid)
        if not isinstance(pid, int):
            problems.append("%s: no integer id" % where)
        elif pid in seen_ids:
            problems.append("%s: id %d already used by panel %r" % (where, pid, seen_ids[pid]))
        else:
            seen_ids[pid] = title
        if not title:
            problems.append("%s: no title" % where)
        if p.get("type") == "row":
            continue
        pos = p.get("gridPos") or {}
        if not all(isinstance(pos.get(k), int) for k in "xywh"):
            problems.append("%s: gridPos needs integer x, y, w, h" % where)
        elif pos["x"] < 0 or pos["w"] <= 0 or pos["x"] + pos["w"] > 24:
            problems.append("%s: gridPos outside the 24-column grid" % where)
        ds = p.get("datasource")
        if not (isinstance(ds, dict) and ds.get("uid")) and not (isinstance(ds, str) and ds):
            problems.append("%s: no datasource reference" % where)
        targets = p.get("targets") or []
        if not targets:
            problems.append("%s: no targets" % where)
        ref_ids = set()
        for t in targets:
            ref = t.get("refId")
            if not ref or ref in ref_ids:
                problems.append("%s: target refId %r missing or repeated" % (where, ref))
            ref_ids.add(ref)
            expr = t.get("expr")
            if not isinstance(expr, str) or not expr.strip():
                problems.append("%s: target %s has an empty expr" % (where, ref))
                continue
            exprs.append(("%s target %s" % (where, ref), expr))

    for v in dashboard.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if v.get("type") == "query" and isinstance(q, str):
            exprs.append(("variable $%s" % v.get("name"), q))

    for where, expr in exprs:
        for name in sorted(set(METRIC_RE.findall(expr))):
            if resolve_metric(name, known) is not None:
                continue
            stem = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES
                         if name.endswith(s) and name[: -len(s)] in known), None)
            if stem:
                problems.append("%s: %s: %s is a %s, not a histogram"
                                % (where, name, stem, known[stem]))
            else:
                problems.append("%s: metric %s is neither in docs/metrics.md nor in NEW_METRICS"
                                % (where, name))
        if "histogram_quantile" in expr and not re.search(r"\ble\b", expr):
            problems.append("%s: histogram_quantile without `le` in its aggregation" % where)
        for m in VAR_RE.finditer(expr):
            var = m.group(1) or m.group(2)
            if var not in defined_vars and var not in GRAFANA_BUILTINS:
                problems.append("%s: variable $%s is not defined" % (where, var))
    return problems, exprs


def promtool_check(promtool, exprs):
    """Parse every panel expression with promtool; returns a list of problems."""
    def substitute(expr):
        def repl(m):
            var = m.group(1) or m.group(2)
            return BUILTIN_VALUES.get(var, ".*")
        return VAR_RE.sub(repl, expr)

    panel_exprs = [(w, e) for w, e in exprs if not w.startswith("variable ")]
    rules = [{"record": "dashboard_check:expr_%d" % i, "expr": substitute(e)}
             for i, (_, e) in enumerate(panel_exprs)]
    # JSON is valid YAML, so no YAML library is needed.
    with tempfile.NamedTemporaryFile("w", suffix=".yml", delete=False) as f:
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        path = f.name
    try:
        r = subprocess.run([promtool, "check", "rules", path], capture_output=True, text=True)
    finally:
        os.unlink(path)
    if r.returncode == 0:
        return []
    # promtool numbers the rules from 1.
    bad = sorted({int(n) for n in re.findall(r"rule (\d+),", r.stdout + r.stderr)})
    problems = ["%s: promtool cannot parse %r" % (panel_exprs[n - 1][0], panel_exprs[n - 1][1])
                for n in bad if 0 < n <= len(panel_exprs)]
    return problems + ["promtool check rules failed:\n" + (r.stdout + r.stderr).strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dashboard", nargs="?", default=DEFAULT_DASHBOARD)
    ap.add_argument("--metrics", default=DEFAULT_METRICS_MD, help="path of docs/metrics.md")
    ap.add_argument("--promtool", help="also parse every expression with this promtool")
    a = ap.parse_args()

    try:
        with open(a.dashboard, encoding="utf-8") as f:
            dashboard = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit("check_dashboard: cannot load %s: %s" % (a.dashboard, e))
    try:
        documented = documented_metrics(a.metrics)
    except OSError as e:
        sys.exit("check_dashboard: cannot read %s: %s" % (a.metrics, e))
    if not documented:
        sys.exit("check_dashboard: no metric table found in %s" % a.metrics)

    known = dict(NEW_METRICS)
    known.update(documented)
    problems, exprs = check(dashboard, known)
    if a.promtool and not problems:
        problems += promtool_check(a.promtool, exprs)

    if problems:
        for p in problems:
            print("check_dashboard: %s" % p, file=sys.stderr)
        print("check_dashboard: %s: %d problem(s)" % (a.dashboard, len(problems)), file=sys.stderr)
        return 1
    n_panels = sum(1 for p in all_panels(dashboard["panels"]) if p.get("type") != "row")
    used = set()
    for _, e in exprs:
        used.update(resolve_metric(n, known) for n in METRIC_RE.findall(e))
    print("check_dashboard: %s: ok (%d panels, %d expressions, %d metrics, %d documented in %s)"
          % (os.path.relpath(a.dashboard), n_panels, len(exprs), len(used), len(documented),
             os.path.relpath(a.metrics)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
