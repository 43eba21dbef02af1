"""Run what the chart renders. The values-cpu-small example's containers (Redis, the model init
container, the Ray head and the prefill and decode worker groups as the KubeRay operator would
start them, the controller and the router) are run on this machine with their own commands,
arguments and environment (Secret references resolved, `$(VAR)` expanded, as Kubernetes does);
only what has to differ off Kubernetes is remapped: service names to 127.0.0.1, ports to free
ones (the pods would each have their own network), paths to a temporary folder. The cluster they
form must serve a completion through the router, with the API key from the rendered Secret.

So what the chart tells the pods to run is what the program accepts: the flags, the cluster.yaml
with its ${NAME} secrets, Ray's token, the custom resources that pin each pool to its group, the
worker ports. Everything started is stopped (its whole process group) and the folder removed,
pass or fail."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.helm.rendered import (
    cluster_yaml,
    command,
    container,
    container_env,
    example,
    one,
    pod_spec,
    ray_resources,
    ray_start_command,
    ray_start_params,
    render,
    secret_data,
)

pytestmark = pytest.mark.slow
RELEASE, NAMESPACE = "demo", "splitserve"
READY_TIMEOUT = 300.0
RAY_CLIENT_GRACE_S = 3


_GIVEN: set[int] = set()


def free_ports(n: int) -> list[int]:
    """n ports free now and not handed out before in this run (the pods' ports all share one host here)."""
    out: list[int] = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            out.append(port)
    return out


def wait_for(cond, timeout: float, what: str, procs: Pods) -> None:
    end = time.monotonic() + timeout
    while not cond():
        procs.check_alive()
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{procs.logs()}")
        time.sleep(0.25)


class Pods:
    """The processes standing in for the pods: each in its own process group, logging to a file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str], *, may_exit: bool = False) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")  # noqa: SIM115 - the process writes it until stopped
        proc = subprocess.Popen(argv, env=env, cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        if not may_exit:
            self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, tail: int = 30) -> str:
        return "\n".join(f"---- {name}\n" + "\n".join(self.log(name).splitlines()[-tail:]) for name in self.procs)

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        assert not dead, f"exited early: {dead}\n{self.logs()}"

    def stop(self) -> None:
        for proc in reversed(self.procs.values()):  # routers and controller first, Redis last
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)
            proc.wait(10)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def kill_leftovers(marker: str) -> None:
    """Ray processes that left their process group (none should): found by the run's folder in
    their command line, ended by pid."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and int(entry.name) != os.getpid():
                try:
                    os.kill(int(entry.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def base_env() -> dict[str, str]:
    """This machine's environment without anything splitserve or Ray would read, the venv's tools
    first on PATH (in the image /etc/profile.d puts them there for KubeRay's login shell)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SPLITSERVE_", "PYTEST"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def remap(argv: list[str], paths: dict[str, str]) -> list[str]:
    out = []
    for arg in argv:
        for old, new in paths.items():
            if arg == old or arg.startswith(old + "/"):
                arg = new + arg[len(old):]
        out.append(arg)
    return out


def post(port: int, body: dict, key: str | None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers=headers)
    r = conn.getresponse()
    return r.status, json.loads(r.read() or b"{}")


def health(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except OSError:
        return False


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_rendered_cpu_small_cluster_serves_a_completion() -> None:
    started = time.monotonic()
    docs = render(example("values-cpu-small.yaml"), name=RELEASE, namespace=NAMESPACE)
    secrets = secret_data(docs)
    # Ray's sockets live under its temp dir, whose path must stay short (AF_UNIX limit)
    folder = Path(tempfile.mkdtemp(prefix="ss-helm-"))
    pods = Pods(folder)
    try:
        _run(docs, secrets, folder, pods, started)
    finally:
        pods.stop()
        kill_leftovers(str(folder))
        shutil.rmtree(folder, ignore_errors=True)


def _run(docs: list[dict], secrets: dict[str, str], folder: Path, pods: Pods, started: float) -> None:
    fullname = f"{RELEASE}-splitserve"
    (redis_port, gcs_port, client_port, dash_port, http_port, grpc_port, prefill_rpc, decode_rpc, decode_kv) = free_ports(9)
    base = base_env()

    # ---- Redis: the StatefulSet's container, its password from the Secret via $(REDIS_PASSWORD)
    redis_sts = one(docs, "StatefulSet", "-redis")
    redis_c = container(redis_sts)
    argv = command(redis_c, container_env(docs, redis_c))
    assert secrets["redis-password"] in argv and "$(REDIS_PASSWORD)" not in argv
    data_mount = next(m["mountPath"] for m in redis_c["volumeMounts"] if m["name"] == "data")
    (folder / "redis-data").mkdir()
    argv = remap(argv, {data_mount: str(folder / "redis-data")})
    argv[argv.index("--port") + 1] = str(redis_port)
    pods.start("redis", [*argv, "--bind", "127.0.0.1"], {**base, **container_env(docs, redis_c)})
    wait_for(lambda: port_open(redis_port), 30, "redis", pods)

    # ---- the model: the init container, the same in every pod that runs the model
    ray = one(docs, "RayCluster")["spec"]
    router_dep = one(docs, "Deployment", "-router")
    inits = [pod_spec(router_dep)["initContainers"], *[g["template"]["spec"]["initContainers"] for g in ray["workerGroupSpecs"]]]
    assert all(i == inits[0] for i in inits) and len(inits[0]) == 1
    mount = inits[0][0]["volumeMounts"][0]["mountPath"]
    paths = {mount: str(folder / "models"), "/etc/splitserve/cluster.yaml": str(folder / "cluster.yaml")}
    init = subprocess.run(remap(command(inits[0][0], {}), paths), env=base, capture_output=True, text=True, timeout=300, check=False)
    assert init.returncode == 0, init.stdout + init.stderr

    # ---- Ray: the head, then each worker group's pods, with the `ray start` KubeRay would write
    head_c = ray["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_env = {**base, **container_env(docs, head_c)}
    assert head_env["RAY_AUTH_MODE"] == "token" and head_env["RAY_AUTH_TOKEN"] == secrets["ray-token"]
    params = ray_start_params(ray["headGroupSpec"], head=True, head_address="")
    assert params["ray-client-server-port"] == "10001" and params["num-cpus"] == "0"
    metrics, agent = free_ports(2)
    params.update({"port": str(gcs_port), "ray-client-server-port": str(client_port), "dashboard-port": str(dash_port), "dashboard-host": "127.0.0.1",
                   "metrics-export-port": str(metrics), "dashboard-agent-listen-port": str(agent),
                   "node-ip-address": "127.0.0.1", "temp-dir": str(folder / "ray")})
    # KubeRay runs `/bin/bash -lc --`; a login shell here would reset PATH, the image's profile.d does not
    pods.start("ray-head", ["bash", "-c", ray_start_command(params, head=True)], head_env)
    wait_for(lambda: port_open(client_port), 120, "the Ray head's client server", pods)

    head_fqdn = f"{fullname}-head-svc.{NAMESPACE}.svc.cluster.local:6379"
    worker_range = iter(range(10002, 19999, 1000))
    for group in ray["workerGroupSpecs"]:
        worker_c = group["template"]["spec"]["containers"][0]
        for i in range(group["replicas"]):
            params = ray_start_params(group, head=False, head_address=head_fqdn)
            assert params["address"] == head_fqdn
            params["address"] = f"127.0.0.1:{gcs_port}"
            for key in [k for k in params if k.endswith("-port") and k not in ("min-worker-port", "max-worker-port")]:
                params[key] = str(free_ports(1)[0])
            low = next(worker_range)
            params.update({"min-worker-port": str(low), "max-worker-port": str(low + 999), "node-ip-address": "127.0.0.1"})
            name = f"ray-{group['groupName']}-{i}"
            pods.start(name, ["bash", "-c", ray_start_command(params, head=False)], {**base, **container_env(docs, worker_c)})
            # one node at a time: Ray gives a starting node 30 s to register, and this machine is small
            wait_for(lambda name=name: "Ray runtime started" in pods.log(name), 120, f"{name} to join the Ray cluster", pods)

    # ---- cluster.yaml from the ConfigMap: service names, ports and the model path remapped
    config = yaml.safe_load(cluster_yaml(docs))
    assert config["redis_url"] == f"redis://:${{SPLITSERVE_REDIS_PASSWORD}}@{fullname}-redis:6379/0"
    config["redis_url"] = config["redis_url"].replace(f"{fullname}-redis:6379", f"127.0.0.1:{redis_port}")
    assert config["ray_address"] == f"ray://{fullname}-head-svc:10001"
    config["ray_address"] = f"ray://127.0.0.1:{client_port}"
    config["model"]["path"] = remap([config["model"]["path"]], paths)[0]
    config["router"].update(http_port=http_port, grpc_port=grpc_port)  # host stays 0.0.0.0, as rendered
    config["prefill"]["port"], config["decode"]["port"], config["decode"]["kv_port"] = prefill_rpc, decode_rpc, decode_kv
    (folder / "cluster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    assert "${SPLITSERVE_CLUSTER_TOKEN}" in (folder / "cluster.yaml").read_text()  # secrets still come from the environment

    # ---- the controller and the router, as their Deployments say. The controller's Ray client
    # gives up a lost session after 3 s instead of 30 (the only change): what a crash would take
    # with it is gone by the time this test looks
    deployments = {}
    for name, suffix in (("controller", "-controller"), ("router", "-router")):
        c = container(one(docs, "Deployment", suffix))
        env = {**base, **container_env(docs, c), **({"RAY_CLIENT_RECONNECT_GRACE_PERIOD": str(RAY_CLIENT_GRACE_S)} if name == "controller" else {})}
        deployments[name] = (remap(command(c, env), paths), env)
        pods.start(name, *deployments[name])
    wait_for(lambda: "splitserve ready: controller only" in pods.log("controller"), READY_TIMEOUT, "the controller's workers", pods)
    wait_for(lambda: health(http_port), READY_TIMEOUT, "the router to see a prefill and a decode worker", pods)

    # ---- the completion, through the router, with the key from the Secret. The prompt is longer
    # than the rendered routing.local_prefill_tokens, so it takes the disaggregated path: prefilled
    # on the prefill group, its KV sent to the decode worker's KV port, decoded there.
    body = {"prompt": "Hello, Kubernetes: " + " ".join(f"pod{i}" for i in range(200)), "max_tokens": 8, "temperature": 0}
    status, reply = post(http_port, body, secrets["api-key-0"])
    assert status == 200, (reply, pods.logs())
    assert reply["usage"]["prompt_tokens"] > config["routing"]["local_prefill_tokens"]
    assert reply["usage"]["completion_tokens"] == 8 and reply["choices"][0]["finish_reason"] == "length"
    timings = reply["timings"]
    assert timings["path"] == "disaggregated" and timings["kv_bytes"] > 0, timings
    assert "-prefill-" in timings["prefill_worker"] and "-decode-" in timings["decode_worker"], timings
    assert post(http_port, body, None)[0] == 401, "the public API must want the generated API key"
    _check_the_same_tokens_as_one_engine(config["model"]["path"], config["model"]["dtype"], body, reply)
    _check_each_pool_holds_its_groups_resources(gcs_port, head_env, ray)
    _check_the_workers_outlive_their_controller(pods, deployments["controller"], http_port, body, secrets["api-key-0"], reply)
    print(f"the rendered cluster served a completion {time.monotonic() - started:.0f} s after the render")


def _check_the_workers_outlive_their_controller(pods: Pods, controller: tuple[list[str], dict], http_port: int, body: dict, key: str,
                                               first: dict) -> None:
    """The controller's pod dies (an OOM kill, an eviction, a node lost; an upgrade ends it with
    SIGTERM, which leaves them too): its workers keep serving, and its replacement adopts them
    instead of starting new ones. Before, they were its Ray session's actors and died with it:
    every such event was an outage of several model loads."""
    workers = {first["timings"]["prefill_worker"], first["timings"]["decode_worker"]}

    def served_by_them(n: int) -> None:  # a prompt of its own: a repeated one would be decoded from the decode worker's cache alone
        status, reply = post(http_port, {**body, "prompt": f"{n}: {body['prompt']}"}, key)
        assert status == 200 and {reply["timings"]["prefill_worker"], reply["timings"]["decode_worker"]} == workers, (reply, pods.logs())

    _signal_group(pods.procs.pop("controller"), signal.SIGKILL)
    time.sleep(RAY_CLIENT_GRACE_S + 5)  # the dead session's own actors would be gone by now
    served_by_them(1)
    pods.start("controller-2", *controller)
    wait_for(lambda: "splitserve ready: controller only" in pods.log("controller-2"), READY_TIMEOUT, "the second controller", pods)
    ready = next(line for line in pods.log("controller-2").splitlines() if line.startswith("splitserve ready"))
    assert ready.split("adopted ")[1].startswith(f"{len(workers)} running workers: ") and all(w in ready for w in workers), ready
    served_by_them(2)


def _check_the_same_tokens_as_one_engine(model: str, dtype: str, body: dict, reply: dict) -> None:
    from splitserve.engine import LLM, SamplingParams

    out = LLM(model, dtype=dtype, device="cpu").generate([body["prompt"]], SamplingParams(temperature=0, max_tokens=body["max_tokens"]))
    assert reply["choices"][0]["text"] == out[0].text


def _check_each_pool_holds_its_groups_resources(gcs_port: int, env: dict[str, str], ray: dict) -> None:
    """Each worker group advertises its pool's resource (prefill: cpDegree units per pod, decode:
    one) and the running workers hold all of it: each landed on its own group's nodes. (Asked as
    a driver on one of this machine's Ray nodes.)"""
    probe = (f"import json, ray; ray.init(address='127.0.0.1:{gcs_port}', logging_level='ERROR', log_to_driver=False); "
             "print(json.dumps([ray.cluster_resources(), ray.available_resources()]))")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    total, available = json.loads(out.stdout.strip().splitlines()[-1])
    for group in ray["workerGroupSpecs"]:
        for name, amount in ray_resources(group["rayStartParams"]).items():
            assert total.get(name) == amount * group["replicas"], (name, total)
            assert available.get(name, 0.0) == 0.0, (name, available)
    assert re.fullmatch(r"\d+(\.\d+)?", str(total.get("CPU", "")))
