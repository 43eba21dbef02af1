"""The Helm chart, checked by the real Helm engine (helm-python-sdk: Helm v4's Go SDK in-process):
lint in strict mode, every example renders, every object validates against the Kubernetes API
schemas (kubernetes-validate) or, for the RayCluster, KubeRay's CRD; bad values fail naming the
value; the rendered cluster.yaml is what splitserve's own loader accepts; golden renders are
current; what the pods are told to run agrees with itself (ports, pools, Ray resources)."""

from __future__ import annotations

import base64
import shutil
from functools import cache
from pathlib import Path

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml

from splitserve.cluster.config import parse_cluster_config
from tests.helm.rendered import (
    CHART,
    cluster_yaml,
    container,
    container_env,
    example,
    one,
    pod_spec,
    ray_resources,
    ray_start_params,
    render,
    script,
    secret_data,
)

EXAMPLES = ["values-cpu-small.yaml", "values-gpu.yaml", "values-external-redis.yaml"]
# The chart's kubeVersion floor, and a current release.
KUBERNETES_VERSIONS = ["1.27.0", "1.37.0"]
CRD = Path(__file__).parent / "schemas" / "ray.io_rayclusters.yaml"
# Kinds that are not core Kubernetes: the RayCluster is checked against KubeRay's CRD; the
# Prometheus Operator's monitors have no schema here, so their shape is checked by hand below.
NOT_CORE = {"RayCluster", "ServiceMonitor", "PodMonitor"}


@cache
def rendered(name: str) -> tuple[dict, ...]:
    return tuple(render(example(name)))


def test_the_examples_are_the_ones_the_issue_asks_for() -> None:
    assert sorted(p.name for p in script().examples()) == sorted(EXAMPLES)


# ---- lint and render ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", [None, *EXAMPLES])
def test_lint_passes_in_strict_mode(name: str | None) -> None:
    report = helm_python.lint(CHART, example(name) if name else None, strict=True)
    bad = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error (info is fine)
    assert report["total_charts_linted"] == 1 and not report["errors"] and not bad, report


@pytest.mark.parametrize("name", EXAMPLES)
def test_each_example_renders_the_whole_deployment(name: str) -> None:
    kinds = sorted({d["kind"] for d in rendered(name)})
    assert {"RayCluster", "ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy"} <= set(kinds)
    names = [d["metadata"]["name"] for d in rendered(name)]
    assert len(names) == len({(d["kind"], d["metadata"]["name"]) for d in rendered(name)}), "two objects share a kind and name"
    redis_deployed = any(d["kind"] == "StatefulSet" for d in rendered(name))
    assert redis_deployed == (name != "values-external-redis.yaml")


def test_defaults_render_too() -> None:
    docs = render()
    assert one(docs, "RayCluster")["spec"]["workerGroupSpecs"][0]["groupName"] == "prefill"


# ---- schemas -------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", EXAMPLES)
def test_every_core_object_validates_against_the_kubernetes_schema(name: str, version: str) -> None:
    checked = []
    for doc in rendered(name):
        if doc["kind"] in NOT_CORE:
            continue
        kubernetes_validate.validate(doc, version, strict=True)  # strict: unknown fields are errors too
        checked.append(doc["kind"])
    assert "Deployment" in checked and "NetworkPolicy" in checked


@cache
def raycluster_schema() -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(CRD.read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == "RayCluster" and crd["spec"]["group"] == "ray.io"
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def undeclared_fields(doc, schema: dict, path: str = "") -> list[str]:
    """Fields the structural schema does not declare: the API server prunes them without a word
    (or refuses them under strict field validation), so a typo would silently do nothing."""
    if isinstance(doc, dict) and schema.get("type") == "object" and not schema.get("x-kubernetes-preserve-unknown-fields"):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        out = []
        for key, value in doc.items():
            if props is not None and key in props:
                out += undeclared_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                out += undeclared_fields(value, extra, f"{path}.{key}")
            elif props is not None and extra is not True:
                out.append(f"{path}.{key}")
        return out
    if isinstance(doc, list) and isinstance(schema.get("items"), dict):
        return [e for i, item in enumerate(doc) for e in undeclared_fields(item, schema["items"], f"{path}[{i}]")]
    return []


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_raycluster_validates_against_kuberays_crd(name: str) -> None:
    ray = one(list(rendered(name)), "RayCluster")
    assert ray["apiVersion"] == "ray.io/v1"
    jsonschema.validate(ray, raycluster_schema(), cls=jsonschema.Draft7Validator)
    assert undeclared_fields({k: v for k, v in ray.items() if k != "metadata"}, raycluster_schema()) == []


def test_the_crd_check_catches_mistakes() -> None:
    ray = one(render(), "RayCluster")
    bad_type = {**ray, "spec": {**ray["spec"], "workerGroupSpecs": [{**ray["spec"]["workerGroupSpecs"][0], "replicas": "two"}]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad_type, raycluster_schema(), cls=jsonschema.Draft7Validator)
    typo = {**ray, "spec": {**ray["spec"], "headGroupSpec": {**ray["spec"]["headGroupSpec"], "rayStartParam": {}}}}
    assert undeclared_fields(typo, raycluster_schema()) == [".spec.headGroupSpec.rayStartParam"]


def test_the_monitors_select_what_exists() -> None:
    docs = list(rendered("values-gpu.yaml"))
    sm, pm = one(docs, "ServiceMonitor"), one(docs, "PodMonitor")
    assert sm["apiVersion"] == pm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "prometheus"
    http = one(docs, "Service", "-http")
    assert sm["spec"]["selector"]["matchLabels"].items() <= http["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert [p["name"] for p in http["spec"]["ports"]] == ["http"]
    ray = one(docs, "RayCluster")["spec"]
    for group in [ray["headGroupSpec"], *ray["workerGroupSpecs"]]:
        labels = group["template"]["metadata"]["labels"]
        assert all(labels[e["key"]] in e["values"] for e in pm["spec"]["selector"]["matchExpressions"])
        assert "metrics" in [p["name"] for p in group["template"]["spec"]["containers"][0]["ports"]]


# ---- bad values fail, naming the value -----------------------------------------------------------
@pytest.mark.parametrize("values, fragments", [
    ({"decode": {"replicas": -1}}, ["/decode/replicas", "minimum", "-1"]),
    ({"prefill": {"replicaz": 2}}, ["/prefill", "replicaz", "not allowed"]),
    ({"colour": "blue"}, ["colour", "not allowed"]),
    ({"kvTransfer": {"transport": "pigeon"}}, ["/kvTransfer/transport", "'grpc', 'torch'"]),
    ({"router": {"replicas": 0}}, ["/router/replicas", "minimum"]),
    ({"workers": {"rpcPort": 50061}}, ["/workers/rpcPort", "maximum"]),
    ({"auth": {"redisPassword": "p@ss/word"}}, ["/auth/redisPassword"]),
    # a prefill instance's CP ranks are placed on one pod: 4 ranks x 1 GPU do not fit a 2-GPU pod
    ({"prefill": {"cpDegree": 4, "rank": {"cpus": 1, "gpus": 1}, "resources": {"cpu": 8, "memory": "8Gi", "gpu": 2}}},
     ["prefill.cpDegree=4", "4 x prefill.rank.gpus (1) = 4 GPUs", "prefill.resources.gpu is 2"]),
    ({"prefill": {"cpDegree": 3, "rank": {"cpus": 2, "gpus": 0}, "resources": {"cpu": 4, "memory": "8Gi", "gpu": 0}}},
     ["prefill.cpDegree=3", "= 6 CPUs", "prefill.resources.cpu is 4"]),
    ({"decode": {"worker": {"cpus": 1, "gpus": 2}, "resources": {"cpu": 2, "memory": "8Gi", "gpu": 1}}}, ["decode.worker.gpus=2", "decode.resources.gpu is 1"]),
    ({"model": {"path": "/data/m"}}, ["model.path=/data/m", "model.source.mountPath=/models"]),
    ({"workers": {"rpcPort": 20001, "kvPort": 20001}}, ["workers.kvPort=20001"]),
    ({"router": {"httpPort": 9000, "grpcPort": 9000}}, ["router.grpcPort=9000"]),
    ({"decode": {"replicas": 65}}, ["decode.replicas=65", "cluster.maxReplicas=64"]),
    ({"prefill": {"kvCacheMemory": "0GiB"}}, ["/prefill/kvCacheMemory", "0GiB"]),
    # on CUDA the controller gives a worker that asks for no GPU one: the pods must have them
    ({"model": {"device": "cuda"}}, ["model.device is cuda", "prefill.resources.gpu is 0"]),
    ({"prefill": {"resources": {"cpu": 4, "memory": "8Gi", "gpu": 1}}}, ["model.device is cuda", "decode.resources.gpu is 0"]),
    ({"prefill": {"cpDegree": 2, "rank": {"cpus": 1, "gpus": 0}, "resources": {"cpu": 4, "memory": "8Gi", "gpu": 1}},
      "decode": {"resources": {"cpu": 2, "memory": "8Gi", "gpu": 1}}}, ["2 ranks of a prefill instance", "(2 in all)", "prefill.resources.gpu is 1"]),
])
def test_bad_values_fail_naming_the_value(values: dict, fragments: list[str]) -> None:
    with pytest.raises((helm_python.HelmValuesError, helm_python.HelmRenderError)) as e:
        render(values)
    assert all(f in str(e.value) for f in fragments), str(e.value)


def test_cp_degree_that_fits_exactly_renders() -> None:
    docs = render({"prefill": {"cpDegree": 4, "rank": {"cpus": 2, "gpus": 1}, "resources": {"cpu": 8, "memory": "8Gi", "gpu": 4}},
                   "decode": {"resources": {"cpu": 2, "memory": "8Gi", "gpu": 1}}})  # CUDA for both pools: decode pods need a GPU too
    prefill = one(docs, "RayCluster")["spec"]["workerGroupSpecs"][0]
    assert ray_resources(prefill["rayStartParams"]) == {"splitserve_prefill": 4.0}


# ---- cluster.yaml: splitserve's own loader accepts it and it carries the values --------------------
def loaded(docs: list[dict], workload: str = "-controller"):
    """cluster.yaml as the controller's (or a router's) process loads it, with its environment."""
    env = container_env(docs, container(one(docs, "Deployment", workload)))
    return parse_cluster_config(yaml.safe_load(cluster_yaml(docs)), env=env), env


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_configmaps_cluster_yaml_loads_with_splitserves_loader(name: str) -> None:
    docs = list(rendered(name))
    values = example(name)
    for workload in ("-controller", "-router"):
        config, _ = loaded(docs, workload)
        assert config.model.path == values["model"]["path"]
        assert config.prefill.replicas == values["prefill"]["replicas"] and config.decode.replicas == values["decode"]["replicas"]
        assert config.prefill.cp_degree == values["prefill"].get("cpDegree", 1)
        assert config.kv_transfer.transport == values.get("kvTransfer", {}).get("transport", "grpc")
        assert config.prefill.resources.custom == {"splitserve_prefill": 1.0} and config.decode.resources.custom == {"splitserve_decode": 1.0}
        secrets = secret_data(docs)
        assert config.cluster_token == secrets["cluster-token"] and len(config.cluster_token) == 48
        assert config.api_keys == [secrets["api-key-0"]] and config.admin_keys == [secrets["admin-key-0"]]
        assert secrets["admin-key-0"] != secrets["api-key-0"] and len(secrets["admin-key-0"]) == 48
        if "external" in values.get("redis", {}):
            assert config.redis_url == values["redis"]["external"]["url"]
        else:
            assert config.redis_url == f"redis://:{secrets['redis-password']}@demo-splitserve-redis:6379/0"
        assert config.ray_address == "ray://demo-splitserve-head-svc:10001"
        assert config.router.cors_origins == values.get("router", {}).get("corsOrigins", [])
    assert config.model.device == ("cuda" if name == "values-gpu.yaml" else "cpu")


def test_given_values_reach_cluster_yaml() -> None:
    docs = render({"cluster": {"name": "llm-b", "blockSize": 32, "heartbeatSeconds": 2, "heartbeatTtlSeconds": 9, "maxRestarts": 2, "maxReplicas": 8},
                   "model": {"path": "/models/x", "dtype": "bfloat16", "maxModelLen": 8192},
                   "prefill": {"maxPrefillChunk": 1024, "kvCacheMemory": "2GiB"}, "decode": {"maxRunningRequests": 32},
                   "router": {"policy": "round_robin", "requestTimeoutS": 30, "maxRetries": 3, "corsOrigins": ["https://a.example", "*"],
                              "drainTimeoutS": 120},
                   "slo": {"ttftMs": 800, "tpotMs": 40}, "kvTransfer": {"leaseSeconds": 12},
                   "routing": {"localPrefillTokens": 0, "balanceFactor": 1.5, "balanceWindow": 16, "indexCapacityBlocks": 5000},
                   "auth": {"clusterToken": "given-token", "apiKeys": ["k1", "k2"], "adminKeys": ["a1"], "redisPassword": "pw-1"}})
    c, _ = loaded(docs)
    assert (c.name, c.block_size, c.heartbeat_seconds, c.heartbeat_ttl_seconds, c.max_restarts) == ("llm-b", 32, 2.0, 9.0, 2)
    assert (c.model.dtype, c.model.max_model_len, c.prefill.max_prefill_chunk, c.prefill.kv_cache_memory) == ("bfloat16", 8192, 1024, 2 << 30)
    assert (c.router.policy, c.router.request_timeout_s, c.router.max_retries, c.decode.max_running_requests) == ("round_robin", 30.0, 3, 32)
    router = one(docs, "Deployment", "-router")["spec"]["template"]["spec"]
    assert c.router.drain_timeout_s == 120.0 and router["terminationGracePeriodSeconds"] == 135  # the preStop pause and the drain fit
    assert (c.slo.ttft_ms, c.slo.tpot_ms, c.kv_transfer.lease_seconds) == (800.0, 40.0, 12.0)
    r = c.routing
    assert (r.local_prefill_tokens, r.balance_factor, r.balance_window, r.index_capacity_blocks) == (0, 1.5, 16, 5000)
    assert loaded(render())[0].router.policy == "workload_aware"
    assert (c.cluster_token, c.api_keys, c.admin_keys) == ("given-token", ["k1", "k2"], ["a1"]) and c.redis_url.startswith("redis://:pw-1@")
    assert c.max_replicas == 8
    assert c.router.cors_origins == ["https://a.example", "*"] and loaded(render())[0].router.cors_origins == []


def test_no_secret_is_written_into_the_configmap() -> None:
    docs = render({"auth": {"clusterToken": "tok-123", "apiKeys": ["key-456"], "adminKeys": ["adm-1"], "redisPassword": "pw-789", "rayToken": "ray-000"}})
    text = yaml.safe_dump(one(docs, "ConfigMap"))
    assert not any(s in text for s in ("tok-123", "key-456", "adm-1", "pw-789", "ray-000"))
    assert set(secret_data(docs).values()) == {"tok-123", "key-456", "adm-1", "pw-789", "ray-000"}


def test_the_public_api_can_be_left_open() -> None:
    docs = render({"auth": {"generateApiKey": False, "generateAdminKey": False}})
    config, _ = loaded(docs)
    assert config.api_keys == config.admin_keys == [] and not any(k.startswith(("api-key", "admin-key")) for k in secret_data(docs))


# ---- generated secrets are kept across upgrades ----------------------------------------------------
def test_generated_secrets_are_read_back_from_the_live_secret(tmp_path: Path) -> None:
    """Offline rendering cannot `lookup` a live Secret, so the helper the Secret uses is driven
    with one: a given value wins, a live value is kept as it is, and only a missing one is new."""
    chart = shutil.copytree(CHART, tmp_path / "splitserve")
    live = base64.b64encode(b"from-the-live-secret").decode()
    (chart / "templates" / "zz-kept.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: kept}\ndata:\n"
        f'  kept: {{{{ include "splitserve.keptSecret" (dict "existing" (dict "cluster-token" "{live}") "key" "cluster-token" "given" "" "length" 48) }}}}\n'
        f'  given: {{{{ include "splitserve.keptSecret" (dict "existing" (dict "cluster-token" "{live}") "key" "cluster-token" "given" "mine" "length" 48) }}}}\n'
        '  new: {{ include "splitserve.keptSecret" (dict "existing" (dict) "key" "cluster-token" "given" "" "length" 48) }}\n')
    secret_template = (chart / "templates" / "secret.yaml").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace (include "splitserve.secretName" .)' in secret_template  # its own live copy
    assert secret_template.count('include "splitserve.keptSecret"') == 5  # every generated value goes through the helper
    with helm_python.Chart.load(chart) as c:
        data = yaml.safe_load(c.render({}, name="demo")["splitserve/templates/zz-kept.yaml"])["data"]
    assert data["kept"] == live and base64.b64decode(data["given"]) == b"mine"
    assert len(base64.b64decode(data["new"])) == 48 and data["new"] != live


def test_a_rotated_secret_rolls_the_pods_that_read_it() -> None:
    """Pods read the Secret at start: without a checksum of it, a rotated key or password reached
    only pods started later (Redis's password then differed from the routers')."""
    def checksums(values: dict) -> dict[str, str]:
        docs = render(values)
        return {d["metadata"]["name"].rsplit("-", 1)[1]: d["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
                for d in docs if d["kind"] in ("Deployment", "StatefulSet")}

    before = checksums({})
    assert sorted(before) == ["controller", "redis", "router"] and checksums({}) == before  # generated secrets: stable across renders
    for rotated, rolled in (({"redisPassword": "new-password"}, {"controller", "redis", "router"}), ({"apiKeys": ["k2"]}, {"controller", "router"}),
                            ({"clusterToken": "t2"}, {"controller", "router"})):
        after = checksums({"auth": rotated})
        assert {name for name in after if after[name] != before[name]} == rolled, rotated


def test_a_host_path_is_one_quoted_value() -> None:
    path = "/mnt/models, type: File"
    docs = render({"model": {"path": "/models/m", "source": {"type": "hostPath", "hostPath": path, "mountPath": "/models"}}})
    group = one(docs, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert next(v for v in group["volumes"] if v["name"] == "model")["hostPath"] == {"path": path, "type": "Directory"}


def test_each_install_generates_different_secrets() -> None:
    assert secret_data(render())["cluster-token"] != secret_data(render())["cluster-token"]


# ---- golden renders --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", EXAMPLES)
def test_golden_renders_are_current(name: str) -> None:
    committed = CHART / "examples" / "rendered" / name
    assert committed.exists(), "run python3 scripts/render_helm_examples.py"
    assert committed.read_text() == script().golden(CHART / "examples" / name), \
        f"{committed.relative_to(CHART.parents[1])} is stale: run python3 scripts/render_helm_examples.py and commit the result"


# ---- what the pods are told agrees with itself -------------------------------------------------------
@pytest.mark.parametrize("name", EXAMPLES)
def test_pools_ports_and_ray_resources_agree(name: str) -> None:
    docs = list(rendered(name))
    config, _ = loaded(docs)
    ray = one(docs, "RayCluster")["spec"]
    groups = {g["groupName"]: g for g in ray["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    for role, pool in (("prefill", config.prefill), ("decode", config.decode)):
        group = groups[role]
        # one instance per pod: pods = pool size, and each pod holds exactly one instance's units
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == pool.replicas
        params = ray_start_params(group, head=False, head_address="head:6379")
        ranks = pool.cp_degree if role == "prefill" else 1
        assert ray_resources(params) == {f"splitserve_{role}": float(ranks)}
        assert pool.resources.custom == {f"splitserve_{role}": 1.0}
        # the instance's ranks fit the Ray node the pod starts
        assert ranks * pool.resources.num_cpus <= float(params["num-cpus"]) and ranks * pool.resources.num_gpus <= float(params["num-gpus"])
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert float(params["num-gpus"]) == float(limits.get("nvidia.com/gpu", 0)) and float(params["num-cpus"]) == float(limits["cpu"])
        ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
        assert ports["rpc"] == pool.port
        if role == "decode":
            assert ports["kv"] == config.decode.kv_port != pool.port
    head = ray["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and not ray_resources(head["rayStartParams"])
    client = next(p for p in head["template"]["spec"]["containers"][0]["ports"] if p["name"] == "client")["containerPort"]
    assert config.ray_address.endswith(f"-head-svc:{client}") and head["rayStartParams"]["ray-client-server-port"] == str(client)
    router = container(one(docs, "Deployment", "-router"))
    assert {p["name"]: p["containerPort"] for p in router["ports"]} == {"http": config.router.http_port, "grpc": config.router.grpc_port}
    assert config.router.host == "0.0.0.0"  # workers then advertise their pod's address (WorkerSpec.host "")


@pytest.mark.parametrize("name", EXAMPLES)
def test_the_network_policy_names_the_ports_the_processes_use(name: str) -> None:
    docs = list(rendered(name))
    config, _ = loaded(docs)
    policy = one(docs, "NetworkPolicy", "-workers")["spec"]
    by_source = {}
    for rule in policy["ingress"]:
        source = rule["from"][0].get("podSelector")
        if source is None:  # Prometheus, by namespace
            component = "namespace " + rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        else:
            component = source.get("matchLabels", {}).get("app.kubernetes.io/component") or ",".join(source["matchExpressions"][0]["values"])
        by_source[component] = [(p["port"], p.get("endPort", p["port"])) for p in rule.get("ports", [])]
    if name == "values-gpu.yaml":
        assert by_source.pop("namespace monitoring") == [(8080, 8080)]
    assert by_source["router"] == [(config.prefill.port, config.prefill.port)] and config.decode.port == config.prefill.port
    assert by_source["prefill,decode"] == []  # workers reach workers on every port: KV, torch links, CP groups
    head_ports = by_source["ray-head"]
    kv = config.decode.kv_port
    assert not any(lo <= kv <= hi for lo, hi in head_ports) and not any(lo <= config.decode.port <= hi for lo, hi in head_ports)
    params = ray_start_params(one(docs, "RayCluster")["spec"]["workerGroupSpecs"][1], head=False, head_address="head:6379")
    for flag in ("node-manager-port", "object-manager-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
                 "dashboard-agent-listen-port"):
        assert any(lo <= int(params[flag]) <= hi for lo, hi in head_ports), flag
    assert (int(params["min-worker-port"]), int(params["max-worker-port"])) in head_ports
    head = one(docs, "NetworkPolicy", "-ray-head")["spec"]["ingress"]
    assert head[1]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "controller"
    assert head[1]["ports"] == [{"port": int(config.ray_address.rsplit(":", 1)[1]), "protocol": "TCP"}]
    assert "ingress" not in one(docs, "NetworkPolicy", "-controller")["spec"]


def test_every_pod_runs_as_the_images_non_root_user() -> None:
    docs = render({"model": {"path": "/models/tiny", "source": {"type": "tiny", "mountPath": "/models"}}})
    specs = [pod_spec(d) for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    ray = one(docs, "RayCluster")["spec"]
    specs += [g["template"]["spec"] for g in [ray["headGroupSpec"], *ray["workerGroupSpecs"]]]
    for spec in specs:  # Pod Security "restricted": non-root, the runtime's seccomp profile, no escalation
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in [*spec["containers"], *spec.get("initContainers", [])]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
    shm = [v for g in [ray["headGroupSpec"], *ray["workerGroupSpecs"]] for v in g["template"]["spec"]["volumes"] if v["name"] == "dshm"]
    assert len(shm) == 3 and all(v["emptyDir"]["medium"] == "Memory" for v in shm)


def test_each_pods_disruption_budget_selects_exactly_its_pods() -> None:
    """A node drain evicts at most maxUnavailable pods of each pool (and of the routers): each
    budget's selector matches its own pods' labels, and no other pod's."""
    docs = render({"prefill": {"podDisruptionBudget": {"maxUnavailable": 2}}})
    ray = one(docs, "RayCluster")["spec"]
    pods = {g["groupName"]: g["template"]["metadata"]["labels"] for g in ray["workerGroupSpecs"]}
    pods["ray-head"] = ray["headGroupSpec"]["template"]["metadata"]["labels"]
    pods.update({d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")})
    budgets = {d["metadata"]["name"].rsplit("-", 1)[-1]: d["spec"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert set(budgets) == {"prefill", "decode", "router"}
    assert (budgets["prefill"]["maxUnavailable"], budgets["decode"]["maxUnavailable"]) == (2, 1)
    for name, budget in budgets.items():
        selected = {pod for pod, labels in pods.items() if budget["selector"]["matchLabels"].items() <= labels.items()}
        assert selected == {next(p for p in pods if p == name or p.endswith(f"-{name}"))}, (name, selected)
