#!/usr/bin/env python3
"""Renders and lints the berth chart with Helm's own engine, and validates
Kubernetes objects against the Kubernetes OpenAPI schemas; prints one JSON
document on stdout for tests/tests/chart.rs to assert on.

Helm comes from PyPI's helm-python-sdk (Helm v4's Go SDK behind a C ABI: no
helm binary, no network), the schemas from kubernetes-validate (strict: unknown
fields are errors). Install both with `pip install -r tests/requirements.txt`.

    helm_check.py render [--values FILE]... [--set-json JSON] [--name N] [--namespace NS]
    helm_check.py lint [--values FILE]...
    helm_check.py examples

Exit status: 0 done (render failures are reported in the JSON, "ok": false),
2 bad usage, 3 a Python dependency is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

MISSING_EXIT = 3
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "chart"
EXAMPLES = CHART / "examples"
# Kubernetes versions the objects must be valid for: the API version the workspace's
# k8s-openapi is built for, and the newest one kubernetes-validate knows.
K8S_VERSIONS = ["1.35", "latest"]


def missing(module: str, err: Exception) -> None:
    msg = (
        f"python module {module!r} is missing ({err}): "
        "run `pip install -r tests/requirements.txt` (from the workspace root)"
    )
    print(json.dumps({"ok": False, "missing_dependency": module, "error": msg}))
    print(msg, file=sys.stderr)
    sys.exit(MISSING_EXIT)


try:
    import yaml
except ImportError as e:  # pragma: no cover - exercised only without the deps
    missing("yaml (PyYAML)", e)
try:
    import helm_python as helm
except ImportError as e:  # pragma: no cover
    missing("helm_python (helm-python-sdk)", e)
try:
    import kubernetes_validate
except ImportError as e:  # pragma: no cover
    missing("kubernetes_validate (kubernetes-validate)", e)


def versions() -> list[str]:
    return [kubernetes_validate.latest_version() if v == "latest" else v for v in K8S_VERSIONS]


def validate(obj: dict[str, Any]) -> dict[str, str]:
    """Strict OpenAPI validation per Kubernetes version: "ok", "no-schema" or the error."""
    out: dict[str, str] = {}
    for v in versions():
        try:
            kubernetes_validate.validate(obj, v, strict=True)
            out[v] = "ok"
        except kubernetes_validate.SchemaNotFoundError:
            out[v] = "no-schema"
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            out[v] = f"invalid at {path or '<root>'}: {e.message}"
    return out


def load_values(files: list[str], set_json: list[str]) -> dict[str, Any] | None:
    """Merges -f files, then --set-json documents, like `helm template -f ... --set-json`."""
    if not files and not set_json:
        return None
    merged: dict[str, Any] = {}

    def merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    for f in files:
        merge(merged, helm.values_from_yaml(Path(f).read_text()))
    for j in set_json:
        merge(merged, json.loads(j))
    return merged


def render(args: argparse.Namespace) -> dict[str, Any]:
    values = load_values(args.values, args.set_json)
    with helm.Chart.load(str(CHART)) as chart:
        try:
            manifests = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
        except helm.HelmError as e:
            return {"ok": False, "error_type": type(e).__name__, "error": str(e)}
    objects = []
    notes = ""
    for template in sorted(manifests):
        text = manifests[template]
        if template.endswith("NOTES.txt"):
            notes = text
            continue
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            objects.append({"template": template, "object": doc, "validation": validate(doc)})
    return {"ok": True, "objects": objects, "notes": notes, "versions": versions()}


def lint(args: argparse.Namespace) -> dict[str, Any]:
    values = load_values(args.values, [])
    report = helm.lint(str(CHART), values, strict=True, kube_version="v1.35.0")
    return {"ok": True, "report": report, "helm": helm.helm_sdk_version()}


def examples(_: argparse.Namespace) -> dict[str, Any]:
    """Every file in chart/examples: YAML documents (Kubernetes objects, or a Helm
    values file whose `template` is a pod template, validated as a Pod) and TOML."""
    files = []
    for path in sorted(EXAMPLES.iterdir()):
        entry: dict[str, Any] = {"file": path.name, "text": path.read_text()}
        if path.suffix in (".yaml", ".yml"):
            docs = []
            for doc in yaml.safe_load_all(entry["text"]):
                if doc is None:
                    continue
                item: dict[str, Any] = {"document": doc}
                if "kind" in doc:
                    item["object"] = doc
                elif isinstance(doc.get("template"), dict) and "spec" in doc["template"]:
                    # A runner chart's pod template: the pod the controller creates.
                    tpl = doc["template"]
                    meta = dict(tpl.get("metadata") or {})
                    meta.setdefault("name", path.stem)
                    item["object"] = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": tpl["spec"]}
                if "object" in item:
                    item["validation"] = validate(item["object"])
                docs.append(item)
            entry["documents"] = docs
        elif path.suffix == ".toml":
            entry["toml"] = tomllib.loads(entry["text"])
        files.append(entry)
    return {"ok": True, "files": files, "versions": versions()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render")
    r.add_argument("--values", action="append", default=[])
    r.add_argument("--set-json", action="append", default=[])
    r.add_argument("--name", default="berth")
    r.add_argument("--namespace", default="berth-system")
    r.set_defaults(func=render)
    l = sub.add_parser("lint")
    l.add_argument("--values", action="append", default=[])
    l.set_defaults(func=lint)
    e = sub.add_parser("examples")
    e.set_defaults(func=examples)
    args = p.parse_args()
    print(json.dumps(args.func(args)))


if __name__ == "__main__":
    main()
