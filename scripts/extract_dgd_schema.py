#!/usr/bin/env python3
"""The levels of the DynamoGraphDeployment CRD that ``dynamo-ext deploy render`` writes, as a JSON Schema.

    python scripts/extract_dgd_schema.py nvidia.com_dynamographdeployments.yaml --commit SHA \
        -o tests/data/dgd_v1beta1_schema.json

Input: ai-dynamo/dynamo's ``deploy/operator/config/crd/bases/nvidia.com_dynamographdeployments.yaml`` (1.6 MB,
mostly embedded pod-spec schemas). Output: the ``openAPIV3Schema`` of one served version (``--version``, default
``v1beta1``) cut to

* the top level (``apiVersion`` and ``kind`` pinned to the group/version and kind, ``metadata``, ``spec``,
  ``status`` kept open),
* ``spec``'s direct fields and ``spec.components[]``'s direct fields, each with its type, enum, pattern, bounds,
  ``required`` and list keys; every deeper object (``podTemplate``, ``experimental``, ``eppConfig``, ...) is
  replaced by ``{"type": "object", "x-kubernetes-preserve-unknown-fields": true}`` (its ``required`` kept),
* ``additionalProperties: false`` on ``spec`` and on a component (and on an object the CRD declares without
  fields): the API server prunes or, under strict field validation (kubectl's default), refuses unknown fields.

Descriptions are dropped; CEL rules (``x-kubernetes-validations``) are kept for reading, ``jsonschema`` ignores
them. The source (repository, path, commit, version) is recorded under ``x-source``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

KEEP = ("type", "enum", "pattern", "format", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
        "anyOf", "x-kubernetes-int-or-string", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
        "x-kubernetes-map-type", "x-kubernetes-validations", "required")  # fmt: skip
OPEN = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def _leaf(schema: dict[str, Any]) -> dict[str, Any]:
    """A field kept at its own level: scalar facts kept, nested objects opened."""
    if schema.get("type") == "object" and ("properties" in schema or schema.get("x-kubernetes-preserve-unknown-fields")):
        out = dict(OPEN)
        if schema.get("required"):
            out["required"] = list(schema["required"])
        return out
    if schema.get("type") == "object" and "additionalProperties" in schema:  # a map
        return {"type": "object", "additionalProperties": _leaf(schema["additionalProperties"])}
    if schema.get("type") == "object":  # declared without fields: nothing may be set inside
        return {"type": "object", "additionalProperties": False}
    out = {k: schema[k] for k in KEEP if k in schema}
    if schema.get("type") == "array" and "items" in schema:
        out["items"] = _leaf(schema["items"])
    return out


def _level(schema: dict[str, Any], deeper: dict[str, Any] | None = None) -> dict[str, Any]:
    """An object whose direct fields are kept (``deeper``: fields whose items get a level of their own)."""
    props = {}
    for name, sub in schema.get("properties", {}).items():
        if deeper and name in deeper:
            props[name] = deeper[name](sub)
        else:
            props[name] = _leaf(sub)
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    for k in ("required", "x-kubernetes-validations"):
        if schema.get(k):
            out[k] = schema[k]
    return out


def _components(schema: dict[str, Any]) -> dict[str, Any]:
    out = {k: schema[k] for k in KEEP if k in schema and k != "type"}
    return {"type": "array", **out, "items": _level(schema["items"])}


def extract(crd: dict[str, Any], version: str = "v1beta1", source: dict[str, Any] | None = None) -> dict[str, Any]:
    group = crd["spec"]["group"]
    kind = crd["spec"]["names"]["kind"]
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    if version not in versions:
        raise SystemExit(f"--version {version}: the CRD serves {sorted(versions)}")
    root = versions[version]["schema"]["openAPIV3Schema"]
    spec = _level(root["properties"]["spec"], deeper={"components": _components})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"{kind} {group}/{version}: spec and spec.components[] levels",
        "x-source": {**(source or {}), "version": version, "served": versions[version].get("served", False)},
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": f"{group}/{version}"},
            "kind": {"const": kind},
            "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
            "spec": spec,
            "status": dict(OPEN),
        },
        "additionalProperties": False,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("crd", help="nvidia.com_dynamographdeployments.yaml")
    p.add_argument("--version", default="v1beta1")
    p.add_argument("--commit", required=True, help="the ai-dynamo/dynamo commit the file was read at")
    p.add_argument("--repository", default="ai-dynamo/dynamo")
    p.add_argument("--path", default="deploy/operator/config/crd/bases/nvidia.com_dynamographdeployments.yaml")
    p.add_argument("--note", default=None, help="recorded under x-source.note (how the file was obtained)")
    p.add_argument("-o", "--output", default=None, help="JSON file (default: stdout)")
    a = p.parse_args(argv)
    docs = [d for d in yaml.safe_load_all(Path(a.crd).read_text()) if d]
    crd = next(d for d in docs if d.get("kind") == "CustomResourceDefinition")
    source = {"repository": a.repository, "path": a.path, "commit": a.commit}
    if a.note:
        source["note"] = a.note
    text = json.dumps(extract(crd, a.version, source), indent=2) + "\n"
    if a.output:
        Path(a.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
