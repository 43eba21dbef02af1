"""Reading what the chart renders: the objects, the containers' environment as Kubernetes would
resolve it (Secret references, `$(VAR)`), and the `ray start` command the KubeRay operator would
write for each Ray pod. Shared by the chart's tests."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
from functools import cache
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "splitserve"


@cache
def script() -> ModuleType:
    """scripts/render_helm_examples.py: the one place the chart is rendered (tests and golden files)."""
    spec = importlib.util.spec_from_file_location("render_helm_examples", ROOT / "scripts" / "render_helm_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(values: dict | None = None, **kw) -> list[dict]:
    return script().manifests(script().render(values, **kw))


def example(name: str) -> dict:
    return script().example_values(CHART / "examples" / name)


def one(docs: list[dict], kind: str, suffix: str = "") -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"expected one {kind} *{suffix}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def container(obj: dict, name: str | None = None) -> dict:
    containers = pod_spec(obj)["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def cluster_yaml(docs: list[dict]) -> str:
    return one(docs, "ConfigMap", "-config")["data"]["cluster.yaml"]


def secret_data(docs: list[dict]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in one(docs, "Secret")["data"].items()}


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand_k8s(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in env values, command and args (unknown ones stay as they are)."""
    return _REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def container_env(docs: list[dict], c: dict) -> dict[str, str]:
    """A container's environment as the kubelet would set it (values from the rendered Secret)."""
    secrets, env = secret_data(docs), {}
    for item in c.get("env", []):
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == one(docs, "Secret")["metadata"]["name"], ref
            env[item["name"]] = secrets[ref["key"]]
        else:
            env[item["name"]] = expand_k8s(item["value"], env)
    return env


def command(c: dict, env: dict[str, str]) -> list[str]:
    return [expand_k8s(a, env) for a in [*c.get("command", []), *c.get("args", [])]]


# ---- what the KubeRay operator does with a group spec --------------------------------------------
# (ray-operator/controllers/ray/common/pod.go: setMissingRayStartParams, generateRayStartCommand,
# convertParamMap): defaults filled in, --num-cpus/--memory/--num-gpus from the container's
# limits where not given, flags in sorted order, "true" as a bare flag; run as
# `/bin/bash -lc -- "ulimit -n 65536; ray start ..."`.
KUBERAY_DEFAULT_METRICS_PORT = "8080"
KUBERAY_DEFAULT_AGENT_LISTEN_PORT = "52365"


def _quantity(value: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value))
    if m.group(2) == "m":
        return int(float(m.group(1)) / 1000)
    return int(float(m.group(1)) * units.get(m.group(2), 1))


def ray_start_params(group: dict, head: bool, head_address: str) -> dict[str, str]:
    params = dict(group.get("rayStartParams", {}))
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    if not head:
        params.setdefault("address", head_address)
    else:
        params.setdefault("dashboard-host", "0.0.0.0")
    params.setdefault("metrics-export-port", KUBERAY_DEFAULT_METRICS_PORT)
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", KUBERAY_DEFAULT_AGENT_LISTEN_PORT)
    if "num-cpus" not in params and "cpu" in limits:
        params["num-cpus"] = str(_quantity(limits["cpu"]))
    if "memory" not in params and "memory" in limits:
        params["memory"] = str(_quantity(limits["memory"]))
    if "num-gpus" not in params and "nvidia.com/gpu" in limits:
        params["num-gpus"] = str(_quantity(limits["nvidia.com/gpu"]))
    return params


def ray_start_command(params: dict[str, str], head: bool) -> str:
    flags = []
    for key in sorted(params):
        value = params[key]
        if value.lower() in ("true", "false") and key not in ("log-color", "include-dashboard", "include-log-monitor"):
            if value.lower() == "true":
                flags.append(f"--{key}")
        else:
            flags.append(f"--{key}={value}")
    return "ulimit -n 65536; ray start " + ("--head " if head else "") + " ".join(flags)


def ray_resources(params: dict[str, str]) -> dict[str, float]:
    """The custom resources a `--resources` flag value advertises ('{"x": 1}', quotes and all)."""
    return json.loads(params.get("resources", "{}").strip("'\"` "))
