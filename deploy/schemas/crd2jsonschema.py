#!/usr/bin/env python3
"""Derive a strict JSON Schema (draft-04) from a CustomResourceDefinition.

Usage: crd2jsonschema.py CRD.yaml VERSION SOURCE > OUT.json

The openAPIV3Schema of a CRD is JSON Schema draft-04 with a few Kubernetes
extensions; draft-04 is chosen because it shares OpenAPI 3.0's boolean
exclusiveMinimum/exclusiveMaximum. The mapping:

- An object with `properties` and without `x-kubernetes-preserve-unknown-fields`
  is structural: the API server drops or (with strict field validation, kubectl's
  default) refuses unknown fields, so it gets `additionalProperties: false`.
  Not inside anyOf/allOf/oneOf/not, whose branches only add value checks.
- `x-kubernetes-int-or-string` allows an integer or a string; `nullable` allows null.
- apiVersion and kind are pinned and metadata.name is required, as the API server does.
- Descriptions, defaults, list/map annotations and CEL rules
  (`x-kubernetes-validations`) are dropped: they do not constrain a manifest's
  shape, or cannot be checked by JSON Schema. Any other keyword is an error, so a
  new CRD feature is never ignored silently.
"""

import json
import sys

import yaml

KEEP = {
    "type", "format", "enum", "required", "pattern", "multipleOf",
    "maximum", "minimum", "exclusiveMaximum", "exclusiveMinimum",
    "maxLength", "minLength", "maxItems", "minItems", "uniqueItems",
    "maxProperties", "minProperties",
}
DROP = {
    "description", "default", "example", "externalDocs", "title",
    "x-kubernetes-validations", "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys", "x-kubernetes-map-type",
}
HANDLED = {
    "properties", "additionalProperties", "items", "allOf", "anyOf", "oneOf",
    "not", "nullable", "x-kubernetes-int-or-string",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
}


def convert(s, path, in_junctor=False):
    unknown = set(s) - KEEP - DROP - HANDLED
    if unknown:
        sys.exit(f"{path}: unsupported keywords {sorted(unknown)}")
    out = {k: v for k, v in s.items() if k in KEEP}
    if s.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if s.get("nullable"):
        t = out.get("type")
        if t is not None:
            out["type"] = (t if isinstance(t, list) else [t]) + ["null"]
        if "enum" in out:
            out["enum"] = out["enum"] + [None]
    if "properties" in s:
        out["properties"] = {
            k: convert(v, f"{path}.{k}", in_junctor) for k, v in s["properties"].items()
        }
    if s.get("x-kubernetes-embedded-resource"):
        # An embedded object always keeps its apiVersion, kind and metadata.
        props = out.setdefault("properties", {})
        for k, t in (("apiVersion", "string"), ("kind", "string"), ("metadata", "object")):
            props.setdefault(k, {"type": t})
    ap = s.get("additionalProperties")
    if isinstance(ap, dict):
        out["additionalProperties"] = convert(ap, f"{path}{{}}", in_junctor)
    elif ap is not None:
        out["additionalProperties"] = ap
    elif (
        "properties" in out
        and not s.get("x-kubernetes-preserve-unknown-fields")
        and not in_junctor
    ):
        out["additionalProperties"] = False
    if "items" in s:
        out["items"] = convert(s["items"], f"{path}[]", in_junctor)
    for j in ("allOf", "anyOf", "oneOf"):
        if j in s:
            out[j] = [convert(b, f"{path}.{j}[{i}]", True) for i, b in enumerate(s[j])]
    if "not" in s:
        out["not"] = convert(s["not"], f"{path}.not", True)
    return out


def main():
    crd_path, version, source = sys.argv[1:4]
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    spec = crd["spec"]
    group, kind = spec["group"], spec["names"]["kind"]
    [ver] = [v for v in spec["versions"] if v["name"] == version]
    root = ver["schema"]["openAPIV3Schema"]
    schema = convert(root, kind)
    props = schema["properties"]
    props["apiVersion"] = {"type": "string", "enum": [f"{group}/{version}"]}
    props["kind"] = {"type": "string", "enum": [kind]}
    props["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "minLength": 1}},
    }
    schema["required"] = ["apiVersion", "kind", "metadata"] + [
        r for r in schema.get("required", []) if r not in ("apiVersion", "kind", "metadata")
    ]
    doc = {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "title": f"{kind} {group}/{version}",
        "description": f"Derived by crd2jsonschema.py from {source}",
    }
    doc.update(schema)
    json.dump(doc, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
