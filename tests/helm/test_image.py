"""The container image, checked without building it (no Docker engine here): the chart's default
image is the one the README says to build; the Dockerfile installs what the chart's pods run
(the whole package with its serve extra, the Ray version the RayCluster declares, torch as
scripts/install.sh pins it) and runs it as the non-root user the pods ask for."""

from __future__ import annotations

import re

import yaml

from tests.helm.rendered import CHART, ROOT, container, one, render

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def stages() -> dict[str, list[str]]:
    """stage name -> its instructions (continuation lines joined)."""
    out: dict[str, list[str]] = {}
    current = None
    for line in re.sub(r"\\\n\s*", " ", DOCKERFILE).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if m:
            current = m.group(2)
            out[current] = [line]
        elif current:
            out[current].append(line)
    return out


PYPROJECT = (ROOT / "pyproject.toml").read_text()


def project_version() -> str:
    return re.search(r'^version = "([^"]+)"$', PYPROJECT, re.MULTILINE).group(1)


def package_dirs() -> set[str]:
    section = PYPROJECT.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r'^"[\w.]+" = "(\w+)"$', section, re.MULTILINE))


def arg_default(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.MULTILINE).group(1)


def test_two_flavors_one_recipe_in_stages() -> None:
    s = stages()
    assert {"base-cpu", "base-cuda", "build", "runtime"} <= set(s)
    assert s["base-cuda"][0].split()[1].startswith("nvidia/cuda:") and "download.pytorch.org/whl/cpu" in " ".join(s["base-cpu"])
    assert s["build"][0].startswith("FROM base-${FLAVOR}") and s["runtime"][0].startswith("FROM base-${FLAVOR}")
    assert arg_default("FLAVOR") == "cpu"
    assert any(i.startswith("COPY --from=build /opt/splitserve") for i in s["runtime"]), "the runtime stage takes the built environment only"


def test_the_build_installs_torch_first_then_the_whole_package_with_its_serve_extra() -> None:
    build = " ".join(stages()["build"])
    assert build.index("torch==${TORCH_VERSION}") < build.index('"/src[serve]"')
    assert f'"torch=={arg_default("TORCH_VERSION")}"' in (ROOT / "scripts" / "install.sh").read_text()
    copied = {m.group(1) for m in re.finditer(r"^COPY (\S+) \./\1$", DOCKERFILE, re.MULTILINE)}
    assert len(package_dirs()) == 8 and package_dirs() <= copied, f"not copied into the image: {package_dirs() - copied}"


def test_the_image_has_the_ray_the_raycluster_declares_with_what_kuberay_and_the_controller_use() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert arg_default("RAY_VERSION") == values["ray"]["version"]
    assert '"ray[default,client]==${RAY_VERSION}"' in DOCKERFILE  # dashboard agent (probes), Ray client (controller)
    assert "wget" in " ".join(stages()["base-cpu"]) and "wget" in " ".join(stages()["base-cuda"])  # KubeRay's exec probes
    assert "/etc/profile.d/" in " ".join(stages()["runtime"])  # KubeRay runs `bash -lc`, which resets PATH


def test_it_runs_as_the_non_root_user_the_pods_ask_for() -> None:
    runtime = stages()["runtime"]
    user = [i.split()[1] for i in runtime if i.startswith("USER ")]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    uid = int(user[-1].split(":")[0])
    assert any(f"--uid {uid}" in i for i in runtime if i.startswith("RUN useradd"))
    docs = render()
    assert container(one(docs, "Deployment", "-router")) and one(docs, "Deployment", "-router")["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid


def test_the_charts_default_image_is_what_the_readme_says_to_build() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = project_version()
    assert chart["appVersion"] == version
    repository = yaml.safe_load((CHART / "values.yaml").read_text())["image"]["repository"]
    readme = (ROOT / "README.md").read_text()
    built = set(re.findall(r"docker build (?:--build-arg FLAVOR=(\w+) )?-t (\S+) \.", readme))
    assert {(flavor or "cpu", tag) for flavor, tag in built} == {("cpu", f"{repository}:{version}-cpu"), ("cuda", f"{repository}:{version}-cuda")}
    assert f"docker push {repository}:{version}-cpu" in readme and f"docker push {repository}:{version}-cuda" in readme
    cpu = container(one(render(), "Deployment", "-router"))["image"]
    one_gpu = {"resources": {"cpu": 2, "memory": "8Gi", "gpu": 1}}  # a GPU in either pool makes the device CUDA, so both need one
    gpu = container(one(render({"prefill": one_gpu, "decode": one_gpu}), "Deployment", "-router"))["image"]
    assert (cpu, gpu) == (f"{repository}:{version}-cpu", f"{repository}:{version}-cuda")
