"""Check Kubeflow MPIJob manifests offline: the CRD's openAPIV3Schema, strictly, plus the mpi-operator's own rules.

    python cluster/k8s/validate.py job.yaml                     # prints "ok: ..." or one line per problem, exit 1
    python cluster/k8s/render.py --workers 4 --image IMG | python cluster/k8s/validate.py -

The schema is `spec.versions[name=v2beta1].schema.openAPIV3Schema` of `../shared/schemas/kubeflow.org_mpijobs.yaml`
(mpi-operator v0.8.2; `--crd FILE` or $MPIJOB_CRD for another), checked by `jsonschema` (draft 4, which OpenAPI v3.0
extends; int32/int64 formats; x-kubernetes-list-type map keys and set items unique). Stricter than an API server on
purpose: unknown fields are errors (the server prunes them, so a typo like `resourcez` would vanish silently), and so
are duplicate YAML keys (YAML keeps the last, so a second `Launcher:` would replace the first).

The operator's rules (pkg/apis/kubeflow/validation and the pods it creates) are schema keywords where they can be
(OPERATOR_RULES: policies, minimums, at least one container, DNS-1123 names) and code where they relate several
fields (operator_errors: one Launcher, replica types, `-np`, pod hostnames, volume references).
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import shlex
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft4Validator, Draft7Validator, FormatChecker, ValidationError, validators

DEFAULT_CRD = Path(__file__).resolve().parents[3] / "shared" / "schemas" / "kubeflow.org_mpijobs.yaml"
API_VERSION, KIND = "kubeflow.org/v2beta1", "MPIJob"
REPLICA_TYPES = ("Launcher", "Worker")
RESTART_POLICIES = ("Never", "OnFailure")  # what the operator's validation accepts (the CRD text lists more)
CLEAN_POD_POLICIES = ("None", "Running", "All")
LAUNCHER_CREATION_POLICIES = ("AtStartup", "WaitForWorkersReady")
# The root `metadata` is a bare `type: object` in the CRD (the API server validates ObjectMeta itself); this is the
# part of ObjectMeta a user-written manifest may set.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META_SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "generateName": {"type": "string"}, "namespace": {"type": "string"},
    "labels": _STRING_MAP, "annotations": _STRING_MAP, "finalizers": {"type": "array", "items": {"type": "string"}}}}
MPI_LAUNCHERS = ("mpirun", "mpiexec", "orterun", "horovodrun")
NP_FLAGS = ("-np", "--np", "-n", "--n", "--num-proc")
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}

DNS_NAMES = {  # kind -> (pattern, max length), as Kubernetes' apimachinery validation defines them
    "DNS-1123 label": (re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), 63),
    "DNS-1035 label": (re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$"), 63),
    "DNS-1123 subdomain": (re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"), 253),
}
# The operator's rules that are plain schema keywords, by path (`*`: any replica type, `[]`: every item); the rules
# that relate several fields (-np, pod hostnames, volume references, the replica types) are code further down.
_POD = "spec.mpiReplicaSpecs.*.template.spec"
OPERATOR_RULES = {
    "metadata.namespace": {"x-dns-name": "DNS-1123 label"},
    "spec.slotsPerWorker": {"minimum": 1},
    "spec.sshAuthMountPath": {"minLength": 1},
    "spec.launcherCreationPolicy": {"enum": list(LAUNCHER_CREATION_POLICIES)},
    "spec.runPolicy.cleanPodPolicy": {"enum": list(CLEAN_POD_POLICIES)},
    **{f"spec.runPolicy.{key}": {"minimum": 0} for key in ("backoffLimit", "activeDeadlineSeconds",
                                                            "ttlSecondsAfterFinished")},
    "spec.mpiReplicaSpecs.*": {"required": ["replicas"]},
    "spec.mpiReplicaSpecs.*.replicas": {"minimum": 1},
    "spec.mpiReplicaSpecs.*.restartPolicy": {"enum": list(RESTART_POLICIES)},
    f"{_POD}.containers": {"minItems": 1},
    f"{_POD}.containers[].name": {"x-dns-name": "DNS-1123 label"},
    f"{_POD}.initContainers[].name": {"x-dns-name": "DNS-1123 label"},
    f"{_POD}.volumes[].name": {"x-dns-name": "DNS-1123 label"},
    f"{_POD}.volumes[].persistentVolumeClaim.claimName": {"x-dns-name": "DNS-1123 subdomain"},
}


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (YAML would silently keep only the last one)", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_documents(text: str) -> list[Any]:
    """All YAML documents in `text` (empty ones dropped); raises yaml.YAMLError on duplicate keys."""
    return [doc for doc in yaml.load_all(text, Loader=_StrictLoader) if doc is not None]


def load_schema(crd_path: str | Path | None = None, version: str = "v2beta1") -> dict:
    """The openAPIV3Schema of `version` in the MPIJob CRD."""
    path = Path(crd_path or os.environ.get("MPIJOB_CRD") or DEFAULT_CRD)
    if not path.is_file():
        raise FileNotFoundError(f"MPIJob CRD not found at {path}; pass --crd FILE or set MPIJOB_CRD")
    # The CRD is 0.6 MB of YAML: libyaml's loader reads it in 0.05 s instead of 0.5 s.
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise ValueError(f"{path} has no version {version}; it has: {[v['name'] for v in crd['spec']['versions']]}")


# ---------------------------------------------------------------------------------------------- schema

def strict_schema(crd_schema: dict) -> dict:
    """The CRD schema made strict: ObjectMeta's user-settable part at `metadata`, unknown object fields and non-string
    keys rejected, OPERATOR_RULES added. A new copy; idempotent, so an already strict schema comes back the same."""
    schema = _strict({**crd_schema, "properties": {**crd_schema["properties"], "metadata": OBJECT_META_SCHEMA}})
    for path, rules in OPERATOR_RULES.items():
        node = schema
        for part in path.split("."):  # every node on the way is a fresh copy made by _strict
            name = part.removesuffix("[]")
            node = node["additionalProperties"] if name == "*" else node["properties"][name]
            node = node["items"] if part.endswith("[]") else node
        node.update(rules)
    return schema


def _strict(schema: dict) -> dict:
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {key: _strict(sub) for key, sub in out["properties"].items()}
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _strict(out[key])
    if "anyOf" in out:
        out["anyOf"] = [_strict(sub) for sub in out["anyOf"]]
    if out.get("type") == "object":
        out["propertyNames"] = {"type": "string"}
        # An API server prunes fields its structural schema does not name; rejecting them catches typos instead.
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def _list_type(validator: Any, list_type: str, instance: Any, schema: dict) -> Iterator[ValidationError]:
    """`x-kubernetes-list-type`: items of a `set`, and the map keys of items of a `map`, are unique."""
    if not isinstance(instance, list) or list_type not in ("set", "map"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen: dict[str, int] = {}
    for i, item in enumerate(instance):
        if list_type == "map" and not isinstance(item, dict):
            continue  # a type error, reported by `items`
        ident = item if list_type == "set" else tuple(item.get(k) for k in keys)
        if repr(ident) in seen:
            what = "item" if list_type == "set" else "/".join(keys)
            yield ValidationError(f"duplicate {what} {ident!r} (also at [{seen[repr(ident)]}])", path=[i])
        seen.setdefault(repr(ident), i)


def _dns_name(validator: Any, kind: str, instance: Any, schema: dict) -> Iterator[ValidationError]:
    """`x-dns-name`: a string is a valid Kubernetes name of that kind (see DNS_NAMES)."""
    if isinstance(instance, str) and not _is_dns(instance, kind):
        yield ValidationError(f"{instance!r} is not a valid {kind}")


def _is_dns(name: Any, kind: str) -> bool:
    pattern, max_len = DNS_NAMES[kind]
    return isinstance(name, str) and len(name) <= max_len and bool(pattern.match(name))


# OpenAPI v3.0 schemas are JSON schema draft 4 plus a few keywords (Draft4's integer excludes 1.0, as Kubernetes does).
_Validator = validators.extend(Draft4Validator, {"x-kubernetes-list-type": _list_type, "x-dns-name": _dns_name,
                                                 "propertyNames": Draft7Validator.VALIDATORS["propertyNames"]})
_FORMATS = FormatChecker(formats=())
for _fmt, (_low, _high) in INT_RANGES.items():
    _FORMATS.checks(_fmt)(lambda v, low=_low, high=_high: not isinstance(v, int) or low <= v <= high)


def _where(path: Iterable[str | int]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".") or "<root>"


def _unknown_field(path: list, key: Any, known: list[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(sorted(known)) or 'none'}"
    return f"{_where([*path, str(key)])}: unknown field{hint}"


_MESSAGES = {  # jsonschema keyword -> message after "<path>: " (required and unknown fields are handled apart)
    "type": "expected {rule}, got {kind} {value!r}",
    "int-or-string": "expected an integer or a string, got {kind}",
    "enum": "{value!r} is not one of {rule}",
    "pattern": "{value!r} does not match {rule}",
    "format": "{value} is out of {rule} range",
    "minimum": "must be at least {rule}, got {value}",
    "minLength": "must have at least {rule} character(s)",
    "minItems": "must have at least {rule} item(s)",
}


def _messages(error: ValidationError) -> list[str]:
    """One jsonschema error as messages that name the field path and the fix."""
    path, value = list(error.absolute_path), error.instance
    where = _where(path)
    if "propertyNames" in error.relative_schema_path:
        return [f"{where}: key {value!r} must be a string (quote it)"]
    if error.validator == "additionalProperties":
        known = list(error.schema.get("properties", {}))
        return [_unknown_field(path, key, known) for key in value if key not in known]
    if error.validator == "required":
        return [f"{_where([*path, key])}: required field is missing" for key in error.validator_value
                if key not in value]
    if value is None:
        return [f"{where}: null is not allowed (remove the key instead)"]
    int_or_string = error.validator == "anyOf" and error.schema.get("x-kubernetes-int-or-string")
    template = _MESSAGES.get("int-or-string" if int_or_string else error.validator, "{message}")
    return [f"{where}: " + template.format(rule=error.validator_value, kind=type(value).__name__, value=value,
                                           message=error.message)]


def schema_errors(job: Any, schema: dict) -> list[str]:
    """Problems of `job` under the strict form of the CRD schema `schema` (see strict_schema), in schema order."""
    found = _Validator(strict_schema(schema), format_checker=_FORMATS).iter_errors(job)
    return list(dict.fromkeys(message for error in found for message in _messages(error)))


# ---------------------------------------------------------------------------------------------- operator rules

def launcher_np(container: dict) -> list[int | str]:
    """The process counts (-np/-n/--num-proc) given to mpirun/horovodrun in a container's command + args.

    Each element is split like a shell would, so `bash -c "... mpirun -np 8 ..."` is understood too.
    """
    tokens: list[str] = []
    for part in [*container.get("command", []), *container.get("args", [])]:
        try:
            tokens += shlex.split(str(part))
        except ValueError:
            tokens.append(str(part))
    counts: list[int | str] = []
    launching = False
    for i, token in enumerate(tokens):
        if os.path.basename(token) in MPI_LAUNCHERS:
            launching = True
            continue
        if not launching:
            continue
        flag, eq, inline = token.partition("=")
        if flag in NP_FLAGS:
            raw = inline if eq else (tokens[i + 1] if i + 1 < len(tokens) else "")
            counts.append(int(raw) if raw.isdigit() else raw)
            launching = False  # one count per launcher invocation
    return counts


def _mount_errors(template: dict, path: str) -> list[str]:
    """Every volumeMount of the pod names one of its volumes."""
    spec = template.get("spec", {}) if isinstance(template, dict) else {}
    volumes = {v.get("name") for v in spec.get("volumes", []) if isinstance(v, dict)}
    errors: list[str] = []
    for group in ("initContainers", "containers"):
        for i, container in enumerate(spec.get(group, [])):
            for j, mount in enumerate(container.get("volumeMounts", [])):
                if mount.get("name") not in volumes:
                    errors.append(f"{path}.spec.{group}[{i}].volumeMounts[{j}].name: no volume named "
                                  f"{mount.get('name')!r} in {path}.spec.volumes")
    return errors


def _replica_errors(specs: dict) -> list[str]:
    errors: list[str] = []
    base = "spec.mpiReplicaSpecs"
    for rtype in specs:
        if rtype not in REPLICA_TYPES:
            errors.append(f"{base}.{rtype}: unknown replica type; use {' and '.join(REPLICA_TYPES)}")
    if "Launcher" not in specs:
        errors.append(f"{base}.Launcher: required; an MPIJob needs exactly one Launcher")
    for rtype in REPLICA_TYPES:
        spec = specs.get(rtype)
        if not isinstance(spec, dict):
            continue
        replicas = spec.get("replicas")
        if rtype == "Launcher" and isinstance(replicas, int) and replicas > 1:  # below 1: OPERATOR_RULES
            errors.append(f"{base}.Launcher.replicas: must be exactly 1, got {replicas}")
        errors += _mount_errors(spec.get("template", {}), f"{base}.{rtype}.template")
    return errors


def _np_errors(job_spec: dict) -> list[str]:
    specs = job_spec.get("mpiReplicaSpecs", {})
    launcher, worker = specs.get("Launcher") or {}, specs.get("Worker") or {}
    slots = job_spec.get("slotsPerWorker", 1)
    workers = worker.get("replicas", 0)
    if not (isinstance(slots, int) and isinstance(workers, int)):
        return []  # already reported as type errors
    hosts = workers + (1 if job_spec.get("runLauncherAsWorker") else 0)
    expected = hosts * slots
    containers = ((launcher.get("template") or {}).get("spec") or {}).get("containers") or []
    counts = [n for c in containers if isinstance(c, dict) for n in launcher_np(c)]
    where = "spec.mpiReplicaSpecs.Launcher.template.spec.containers"
    if not counts:
        return [f"{where}: no `mpirun -np N` (or horovodrun -np N) in the launcher's command/args; state -np "
                f"explicitly ({expected} = {hosts} worker(s) x slotsPerWorker {slots})"]
    return [f"{where}: launcher runs -np {n} but Worker replicas x slotsPerWorker = {hosts} x {slots} = {expected}"
            for n in counts if n != expected]


def operator_errors(job: dict) -> list[str]:
    """The mpi-operator's rules that relate several fields (the rest are OPERATOR_RULES, checked with the schema):
    exactly one Launcher replica; replica types only Launcher/Worker; `-np` of the launcher's mpirun/horovodrun equal
    to Worker replicas x slotsPerWorker (plus one worker's slots with runLauncherAsWorker); `<name>-launcher` and
    `<name>-worker-<N-1>` valid DNS-1035 labels (pod hostnames under the job's Service); every volumeMount names a
    volume of its pod."""
    errors: list[str] = []
    meta = job.get("metadata") if isinstance(job.get("metadata"), dict) else {}
    spec = job.get("spec") if isinstance(job.get("spec"), dict) else {}
    specs = spec.get("mpiReplicaSpecs") if isinstance(spec.get("mpiReplicaSpecs"), dict) else {}
    name = meta.get("name")
    workers = (specs.get("Worker") or {}).get("replicas", 1) if isinstance(specs.get("Worker"), dict) else 1
    if not name:
        errors.append("metadata.name: required (pod and Service names derive from it)")
    else:
        last = max(1, workers if isinstance(workers, int) else 1) - 1
        for pod in (str(name), f"{name}-launcher", f"{name}-worker-{last}"):
            if not _is_dns(pod, "DNS-1035 label"):
                errors.append(f"metadata.name: {name!r} gives the name {pod!r}, which is not a valid DNS-1035 label "
                              "(lowercase letters, digits and '-', starting with a letter, at most 63 characters)")
                break
    errors += _replica_errors(specs)
    if isinstance(specs.get("Launcher"), dict):
        errors += _np_errors(spec)
    return errors


def validate(job: Any, schema: dict) -> list[str]:
    """Every problem with one MPIJob manifest (empty list = valid)."""
    if not isinstance(job, dict):
        return [f"<root>: expected a mapping (an MPIJob), got {type(job).__name__}"]
    errors: list[str] = []
    if job.get("apiVersion") != API_VERSION:
        errors.append(f"apiVersion: {job.get('apiVersion')!r}; this validator checks {API_VERSION}")
    if job.get("kind") != KIND:
        errors.append(f"kind: {job.get('kind')!r}; expected {KIND}")
    errors += schema_errors(job, schema)
    try:
        errors += operator_errors(job)
    except (AttributeError, TypeError, KeyError):
        if not errors:
            raise
        # The operator's rules assume the shapes the schema requires; the schema errors above say what to fix.
    return errors


def validate_text(text: str, schema: dict) -> list[str]:
    """Problems in every document of a YAML stream, prefixed with the document index when there are several."""
    try:
        docs = load_documents(text)
    except yaml.YAMLError as err:
        return [f"YAML: {err}"]
    if not docs:
        return ["YAML: no documents"]
    return [(f"document {i}: " if len(docs) > 1 else "") + error
            for i, doc in enumerate(docs) for error in validate(doc, schema)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="manifest files; - reads stdin")
    parser.add_argument("--crd", help=f"MPIJob CRD YAML (default $MPIJOB_CRD or {DEFAULT_CRD})")
    args = parser.parse_args(argv)
    schema = load_schema(args.crd)
    failed = False
    for name in args.files:
        label = "<stdin>" if name == "-" else name
        errors = validate_text(sys.stdin.read() if name == "-" else Path(name).read_text(), schema)
        print("\n".join(f"{label}: {error}" for error in errors) if errors else f"ok: {label}")
        failed |= bool(errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
