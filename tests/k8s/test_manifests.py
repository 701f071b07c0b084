"""What the rendered objects must say: probes, grace periods, resources, security, images, secrets, policy.

Owns: the operational contract between the manifests and the programs they run. The drain grace and the
setting names come from the service and worker settings modules, so a changed default there fails here.
Must not know: schemas (test_validate.py) or security lint (test_checkov.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from service.settings import ServeSettings, split_address
from tests.k8s.render import COMPOSITIONS, DEV_IMAGE, IMAGE_NAME, K8S, OVERLAYS, REPO, Rendered, kustomize
from worker.settings import WorkerSettings

ALL = [*OVERLAYS, *COMPOSITIONS]
PROTO = (REPO / "proto" / "safety" / "v1" / "safety.proto").read_text()
SERVICE_NAME = "{}.{}".format(
    re.search(r"^package\s+([\w.]+);", PROTO, re.M).group(1),
    re.search(r"^service\s+(\w+)", PROTO, re.M).group(1),
)
KNOWN_SETTINGS = {f.metadata["env"] for cls in (ServeSettings, WorkerSettings) for f in fields(cls)}
SECRET_SETTINGS = {"SAFETY_API_KEY", "SAFETY_TLS_KEY"}
DRAIN_MARGIN_S = 5  # the server's own stop after the drain grace, and signal delivery
# A GPU worker's longest chunk (solo_max_chunk_s): its first on a cold worker pays the model load,
# torch.compile (16-20 s) and the CUDA-graph capture (~14 s); then at most 4 tokens a character (byte-level
# BPE: emoji, rare CJK) at 0.5M tokens/s, the low end of what an H100 measured (docs/benchmarks.md).
GPU_COLD_START_S = 35
GPU_TOKENS_PER_S = 500_000
MAX_TOKENS_PER_CHAR = 4  # model/classifier.py's (test_the_solo_chunk_bound_is_the_stated_one checks)


def default(cls: type, env: str) -> Any:
    return next(f.default for f in fields(cls) if f.metadata["env"] == env)


def pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def port_named(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container.get("ports", []) if p["name"] == name]
    return port


def ours(r: Rendered) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every container that runs our image: the registry placeholder's, or the
    dev overlay's local build."""
    return [
        (w, c)
        for w in r.workloads()
        for c in containers(w)
        if c["image"].startswith(IMAGE_NAME + ":") or c["image"] == DEV_IMAGE
    ]


def grpc_container(r: Rendered) -> dict[str, Any]:
    return r.get("Deployment", "safety-grpc")["spec"]["template"]["spec"]["containers"][0]


def worker_container(r: Rendered) -> dict[str, Any]:
    return r.get("Deployment", "safety-worker")["spec"]["template"]["spec"]["containers"][0]


def worker_metrics_port(r: Rendered) -> int:
    """The port `safety worker` serves /metrics on, as the rendered ConfigMap sets it (else the default)."""
    config = r.config()
    return int(
        config.get("SAFETY_WORKER_METRICS_PORT") or default(WorkerSettings, "SAFETY_WORKER_METRICS_PORT")
    )


def drain_grace(config: dict[str, str], cls: type) -> float:
    return float(config.get("SAFETY_DRAIN_GRACE_S") or default(cls, "SAFETY_DRAIN_GRACE_S"))


# ---- settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_config_names_only_known_settings(rendered: dict[str, Rendered], name: str) -> None:
    config = rendered[name].config()
    assert set(config) <= KNOWN_SETTINGS, f"unknown settings (typo?): {set(config) - KNOWN_SETTINGS}"
    assert not set(config) & SECRET_SETTINGS, "secrets belong in a Secret, not the ConfigMap"
    assert urlsplit(config["SAFETY_REDIS_URL"]).password is None, "a Redis password must come from a Secret"
    ServeSettings.from_env(config)  # the programs accept every value (raises naming the variable if not)
    WorkerSettings.from_env(config)


@pytest.mark.parametrize("name", ALL)
def test_every_container_takes_the_config(rendered: dict[str, Rendered], name: str) -> None:
    r = rendered[name]
    config_name = next(
        o["metadata"]["name"]
        for o in r.of_kind("ConfigMap")
        if o["metadata"]["name"].startswith("safety-config-")
    )
    for workload, container in ours(r):
        refs = [e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e]
        assert refs == [config_name], f"{workload['metadata']['name']}: envFrom {refs}"


# ---- probes and ports ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_probes_are_grpc_health_on_the_served_port(rendered: dict[str, Rendered], name: str) -> None:
    r = rendered[name]
    container = grpc_container(r)
    served = int(
        split_address(r.config().get("SAFETY_ADDRESS") or default(ServeSettings, "SAFETY_ADDRESS"))[1]
    )
    assert port_named(container, "grpc") == served
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = container[probe]
        assert set(spec) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, (
            f"{probe} is not a gRPC probe"
        )
        assert spec["grpc"]["port"] == served, (
            f"{probe} probes port {spec['grpc']['port']}, server on {served}"
        )
    # Readiness and startup follow the classifier (NOT_SERVING until warm, and while draining);
    # liveness asks for the server as a whole.
    assert container["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["livenessProbe"]["grpc"].get("service", "") == ""


@pytest.mark.parametrize("name", ALL)
def test_service_speaks_grpc_to_the_pods(rendered: dict[str, Rendered], name: str) -> None:
    r = rendered[name]
    deployment = r.get("Deployment", "safety-grpc")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = [s for s in r.of_kind("Service") if s["spec"]["selector"].items() <= pod_labels.items()]
    assert {s["metadata"]["name"] for s in services} == {"safety-grpc", "safety-grpc-headless"}
    for service in services:
        (grpc,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc["appProtocol"] == "grpc"
        assert grpc["targetPort"] in ("grpc", port_named(grpc_container(r), "grpc"))
    assert r.get("Service", "safety-grpc-headless")["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("name", ALL)
def test_metrics_port_is_scraped(rendered: dict[str, Rendered], name: str) -> None:
    r = rendered[name]
    deployment = r.get("Deployment", "safety-grpc")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    metrics = int(
        split_address(
            r.config().get("SAFETY_METRICS_ADDRESS") or default(ServeSettings, "SAFETY_METRICS_ADDRESS")
        )[1]
    )
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics == port_named(grpc_container(r), "metrics")
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("name", ALL)
def test_worker_metrics_port_is_scraped(rendered: dict[str, Rendered], name: str) -> None:
    """The worker's exporter is on, and its port, the container port and the scrape annotations agree."""
    r = rendered[name]
    assert "SAFETY_WORKER_METRICS_PORT" in r.config(), "state the worker's metrics port in safety.env"
    metrics = worker_metrics_port(r)
    assert metrics != 0, "SAFETY_WORKER_METRICS_PORT=0 turns off the metrics the dashboard's job panels chart"
    annotations = r.get("Deployment", "safety-worker")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics == port_named(worker_container(r), "metrics")
    assert annotations["prometheus.io/path"] == "/metrics"
    assert [p["name"] for p in worker_container(r)["ports"]] == ["metrics"], "the worker's only port"
    (port,) = worker_container(r)["ports"]
    assert port["protocol"] == "TCP"


# ---- shutdown ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_grpc_grace_outlasts_prestop_and_drain(rendered: dict[str, Rendered], name: str) -> None:
    r = rendered[name]
    spec = pod(r.get("Deployment", "safety-grpc"))
    container = grpc_container(r)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = drain_grace(r.config(), ServeSettings)
    assert pre_stop >= 5, "endpoints need a few seconds to drop the pod before it stops accepting calls"
    grace = spec["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + drain + DRAIN_MARGIN_S, (
        f"grace {grace} s < preStop {pre_stop} s + drain {drain} s + margin {DRAIN_MARGIN_S} s"
    )
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > drain, "liveness would kill a draining server"


def worker_pool(r: Rendered) -> str:
    """The Celery pool the worker container runs: its --pool argument, else `safety worker`'s default for
    SAFETY_DEVICE (solo on CUDA; "auto" may find a GPU, so solo too)."""
    args = worker_container(r)["args"]
    for i, arg in enumerate(args):
        if arg == "--pool":
            return args[i + 1]
        if arg.startswith("--pool="):
            return arg.split("=", 1)[1]
    device = r.config().get("SAFETY_DEVICE") or default(WorkerSettings, "SAFETY_DEVICE")
    return "prefork" if device == "cpu" else "solo"


def solo_max_chunk_s(config: dict[str, str]) -> float:
    """The longest chunk a solo-pool (GPU) worker is stated to run (docs/deploy.md, "Shutdown and draining"),
    which SIGTERM lets it finish: a cold worker's model load, torch.compile and CUDA-graph capture, then
    SAFETY_CHUNK_SIZE texts of SAFETY_MAX_TEXT_CHARS characters at MAX_TOKENS_PER_CHAR tokens a character,
    at GPU_TOKENS_PER_S."""
    chunk = int(config.get("SAFETY_CHUNK_SIZE") or default(WorkerSettings, "SAFETY_CHUNK_SIZE"))
    chars = int(config.get("SAFETY_MAX_TEXT_CHARS") or default(WorkerSettings, "SAFETY_MAX_TEXT_CHARS"))
    return GPU_COLD_START_S + chunk * chars * MAX_TOKENS_PER_CHAR / GPU_TOKENS_PER_S


@pytest.mark.parametrize("name", ALL)
def test_worker_grace_outlasts_its_drain_or_its_chunk(rendered: dict[str, Rendered], name: str) -> None:
    """prefork (CPU) hands the running chunk back after SAFETY_DRAIN_GRACE_S; the solo pool (GPU) cannot, and
    finishes it however long it takes: its grace must cover the longest chunk, or SIGKILL leaves the chunk
    to the visibility timeout (an hour) and costs it an attempt."""
    r = rendered[name]
    spec = pod(r.get("Deployment", "safety-worker"))
    pre_stop = (
        spec["containers"][0].get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    )
    grace = spec["terminationGracePeriodSeconds"]
    if worker_pool(r) == "prefork":
        drain = drain_grace(r.config(), WorkerSettings)
        assert grace >= pre_stop + drain + DRAIN_MARGIN_S
    else:
        longest = solo_max_chunk_s(r.config())
        assert grace >= pre_stop + longest + DRAIN_MARGIN_S, (
            f"{name}: a solo worker's grace {grace} s < its longest chunk {longest:.0f} s + margin"
        )


def test_the_solo_chunk_bound_is_the_stated_one(rendered: dict[str, Rendered]) -> None:
    """The figures above are docs/deploy.md's: ~445 s for the GPU overlay's settings, under its grace."""
    assert worker_pool(rendered["gpu"]) == "solo" and worker_pool(rendered["cpu"]) == "prefork"
    assert round(solo_max_chunk_s(rendered["gpu"].config())) == 445
    from model.classifier import MAX_TOKENS_PER_CHAR as engines

    assert engines == MAX_TOKENS_PER_CHAR
    doc = (REPO / "docs" / "deploy.md").read_text()
    assert "terminationGracePeriodSeconds: 600" in doc and "~445 s" in doc


def test_drain_default_matches_the_config(rendered: dict[str, Rendered]) -> None:
    """The ConfigMap states the drain grace the programs default to (a changed default shows up here)."""
    config = rendered["cpu"].config()
    assert float(config["SAFETY_DRAIN_GRACE_S"]) == default(ServeSettings, "SAFETY_DRAIN_GRACE_S")
    assert float(config["SAFETY_DRAIN_GRACE_S"]) == default(WorkerSettings, "SAFETY_DRAIN_GRACE_S")


# ---- resources, security, images -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_every_container_has_resources(rendered: dict[str, Rendered], name: str) -> None:
    for workload in rendered[name].workloads():
        for c in containers(workload):
            where = f"{workload['metadata']['name']}/{c['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), f"{where}: {kind}"


@pytest.mark.parametrize("name", ALL)
def test_every_container_is_locked_down(rendered: dict[str, Rendered], name: str) -> None:
    for workload in rendered[name].workloads():
        spec = pod(workload)
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
        writable = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in containers(workload):
            where = f"{workload['metadata']['name']}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod_sc.get("runAsUser", 0)) != 0, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert not sc.get("privileged"), where
            assert "ALL" in sc.get("capabilities", {}).get("drop", []), where
            assert not sc.get("capabilities", {}).get("add"), where
        for _, c in [(w, c) for w, c in ours(rendered[name]) if w is workload]:
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in writable, f"{c['name']}: needs a writable emptyDir at /tmp"


@pytest.mark.parametrize("name", ALL)
def test_images_are_pinned(rendered: dict[str, Rendered], name: str) -> None:
    for workload in rendered[name].workloads():
        for c in containers(workload):
            image = c["image"]
            if "@sha256:" in image:
                continue
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"{workload['metadata']['name']}/{c['name']}: unpinned {image}"
            assert c.get("imagePullPolicy") in ("Always", "IfNotPresent")
    assert ours(rendered[name]), "no container runs the safety-classifier image"


@pytest.mark.parametrize("name", ALL)
def test_api_key_is_a_secret_reference(rendered: dict[str, Rendered], name: str) -> None:
    r = rendered[name]
    assert not r.of_kind("Secret"), "no Secret (and so no secret value) is committed or generated"
    env = {e["name"]: e for e in grpc_container(r)["env"]}
    ref = env["SAFETY_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "safety-api-key" and ref["key"] == "api-key"
    if name != "dev":
        assert not ref.get("optional"), "outside dev the server must not start without its API key"
    for workload, container in ours(r):
        for e in container.get("env", []):
            if re.search(r"KEY|TOKEN|PASSWORD|SECRET", e["name"]):
                assert "value" not in e, f"{workload['metadata']['name']}: {e['name']} inlined"


# ---- objects around the Deployments --------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_commands_and_namespace(rendered: dict[str, Rendered], name: str) -> None:
    r = rendered[name]
    assert [c["args"][0] for c in containers(r.get("Deployment", "safety-grpc"))] == ["serve"]
    assert [c["args"][0] for c in containers(r.get("Deployment", "safety-worker"))] == ["worker"]
    (namespace,) = r.of_kind("Namespace")
    for o in r.objects:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == namespace["metadata"]["name"], (
                f"{o['kind']}/{o['metadata']['name']}"
            )
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "safety-classifier"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("name", ALL)
def test_hpa_and_pdbs_select_real_pods(rendered: dict[str, Rendered], name: str) -> None:
    r = rendered[name]
    (hpa,) = r.of_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "safety-grpc"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for workload in r.workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        pdbs = [
            p
            for p in r.of_kind("PodDisruptionBudget")
            if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert len(pdbs) == 1, f"{workload['metadata']['name']}: {len(pdbs)} PodDisruptionBudgets"


def _policy(r: Rendered, app: str) -> dict[str, Any]:
    (policy,) = [
        p for p in r.of_kind("NetworkPolicy")
        if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == app
        and "Egress" in p["spec"]["policyTypes"]
    ]  # fmt: skip
    return policy["spec"]


@pytest.mark.parametrize("name", ALL)
def test_network_policies(rendered: dict[str, Rendered], name: str) -> None:
    r = rendered[name]
    deny = r.get("NetworkPolicy", "default-deny-all")["spec"]
    assert (
        deny["podSelector"] == {}
        and set(deny["policyTypes"]) == {"Ingress", "Egress"}
        and "ingress" not in deny
    )
    grpc = _policy(r, "safety-grpc")
    served = port_named(grpc_container(r), "grpc")
    to_grpc = [rule for rule in grpc["ingress"] if {p["port"] for p in rule["ports"]} == {served}]
    (rule,) = to_grpc
    gateway = [f for f in rule["from"] if "namespaceSelector" in f]
    assert gateway == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "llm-gateway"}}}]
    if name != "dev":
        assert rule["from"] == gateway, "only the gateway namespace reaches the gRPC port"
    worker = _policy(r, "safety-worker")
    assert worker["ingress"] == [
        {
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            "ports": [{"port": worker_metrics_port(r), "protocol": "TCP"}],
        }
    ], "only Prometheus (the monitoring namespace) connects to a worker, and only to its metrics port"
    egress_ports = sorted((p["protocol"], p["port"]) for rule in worker["egress"] for p in rule["ports"])
    assert egress_ports == [("TCP", 53), ("TCP", 6379), ("UDP", 53)], "workers reach Redis (and DNS) only"
    for rule in worker["egress"]:
        if any(p["port"] == 6379 for p in rule["ports"]):
            assert [t["podSelector"] for t in rule["to"]] == [
                {"matchLabels": {"app.kubernetes.io/name": "redis"}}
            ]


# ---- overlays ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpu", "keda", "gpu+grafana-dashboard"])
def test_gpu_overlay(rendered: dict[str, Rendered], name: str) -> None:
    r = rendered[name]
    config = r.config()
    assert config["SAFETY_DEVICE"] == "cuda" and config["SAFETY_DTYPE"] in ("bfloat16", "float16")
    assert config["SAFETY_WORKER_CONCURRENCY"] == "1", "one worker process per GPU"
    for workload, container in ours(r):
        spec = pod(workload)
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        # torch.compile (on by default on CUDA) starts min(32, CPUs in the affinity mask) compile processes,
        # blind to the CPU limit: pin them to the limit
        env = {e["name"]: e for e in container.get("env", [])}
        threads = env["TORCHINDUCTOR_COMPILE_THREADS"]["valueFrom"]["resourceFieldRef"]
        assert threads["resource"] == "limits.cpu" and threads["containerName"] == container["name"]
        assert threads.get("divisor", "1") == "1"
    worker = r.get("Deployment", "safety-worker")
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "a rollout must not need a spare GPU"
    assert containers(worker)[0]["args"] == ["worker", "--pool", "solo"], "one process per GPU"


@pytest.mark.parametrize("name", ["cpu", "dev", "cpu+model-volume"])
def test_cpu_overlay(rendered: dict[str, Rendered], name: str) -> None:
    r = rendered[name]
    assert r.config()["SAFETY_DEVICE"] == "cpu"
    for _, container in ours(r):
        assert "nvidia.com/gpu" not in container["resources"]["limits"]
        env = {e["name"]: e for e in container.get("env", [])}
        if container["name"] == "worker":
            # `safety worker` divides the CPU limit among its prefork processes; a pinned OMP_NUM_THREADS
            # would give each of them the whole limit
            assert "OMP_NUM_THREADS" not in env
            continue
        threads = env["OMP_NUM_THREADS"]["valueFrom"]["resourceFieldRef"]
        assert threads["resource"] == "limits.cpu" and threads["containerName"] == container["name"]


@pytest.mark.parametrize("name", ["gpu", "keda", "gpu+grafana-dashboard"])
def test_gpu_overlays_run_the_cuda_image(rendered: dict[str, Rendered], name: str) -> None:
    """The GPU overlays set SAFETY_DEVICE=cuda: the CPU-torch image (tag 0.1.0) would exit at start-up
    with "device: 'cuda' requested but CUDA is not available"."""
    r = rendered[name]
    assert r.config()["SAFETY_DEVICE"] == "cuda"
    for _, container in ours(r):
        assert container["image"] == f"{IMAGE_NAME}:0.1.0-cuda", container["image"]


@pytest.mark.parametrize("name", ALL)
def test_autoscaled_deployments_leave_replicas_to_the_autoscaler(
    rendered: dict[str, Rendered], name: str
) -> None:
    """`kubectl apply` of a Deployment that names spec.replicas scales it back to that number, whatever the
    HPA (or KEDA's HPA) had scaled it to (kubernetes.io, HPA: "Migrating Deployments ... to horizontal
    autoscaling")."""
    r = rendered[name]
    targets = {h["spec"]["scaleTargetRef"]["name"] for h in r.of_kind("HorizontalPodAutoscaler")}
    targets |= {s["spec"]["scaleTargetRef"]["name"] for s in r.of_kind("ScaledObject")}
    assert "safety-grpc" in targets
    for d in r.of_kind("Deployment"):
        if d["metadata"]["name"] in targets:
            assert "replicas" not in d["spec"], f"{d['metadata']['name']}: replicas fights its autoscaler"


def test_dev_overlay_has_its_redis(rendered: dict[str, Rendered]) -> None:
    r = rendered["dev"]
    url = urlsplit(r.config()["SAFETY_REDIS_URL"])
    service = r.get("Service", url.hostname)
    (port,) = service["spec"]["ports"]
    assert port["port"] == (url.port or 6379)
    redis = r.get("Deployment", "redis")
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    args = containers(redis)[0]["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction", "a broker must never evict a task"


@pytest.mark.parametrize("name", ALL)
def test_only_the_dev_overlay_runs_a_local_image(rendered: dict[str, Rendered], name: str) -> None:
    """kind and minikube run the image the user built and loaded into the node: a name no registry serves,
    used as it is (IfNotPresent; Always would pull it and fail with ErrImagePull). Every other overlay keeps
    the registry image, pulled on every start."""
    for workload, container in ours(rendered[name]):
        where = f"{name}: {workload['metadata']['name']}/{container['name']}"
        if name == "dev":
            assert container["image"] == DEV_IMAGE, where
            assert container["imagePullPolicy"] == "IfNotPresent", where
        else:
            assert container["image"].startswith(IMAGE_NAME + ":"), where
            assert container["imagePullPolicy"] == "Always", where


def test_the_dev_steps_build_and_load_the_dev_overlays_image() -> None:
    """docs/deploy.md's "Trying it out" builds, loads (kind and minikube) and applies what the dev overlay
    runs."""
    doc = (REPO / "docs" / "deploy.md").read_text()
    steps = doc[doc.index("**Trying it out**") :]
    steps = steps[: steps.index("\n**", 1)]
    assert f"docker build -t {DEV_IMAGE} ." in steps, steps
    assert f"kind load docker-image {DEV_IMAGE}" in steps, steps
    assert f"minikube image load {DEV_IMAGE}" in steps, steps
    assert "kubectl apply -k k8s/overlays/dev" in steps, steps


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_the_digest_pinning_advice_pins_the_digest(overlay: str, tmp_path: Path) -> None:
    """k8s/checkov-skips.yaml accepts tag-pinned images because a release overlay pins its digest with the
    `kustomize edit set image OLD=NEW@sha256:...` it names: the `images:` entry that command writes, in an
    overlay of ours, must change every container of our image (OLD must be the name the base renamed the
    image to, not the one its Deployments start from)."""
    skip = next(s for s in yaml.safe_load((K8S / "checkov-skips.yaml").read_text())["skips"]
                if s["id"] == "CKV_K8S_43")  # fmt: skip
    advice = re.search(r"kustomize edit set image\s+(\S+)=(\S+)@sha256:\.\.\.", skip["reason"])
    assert advice, skip["reason"]
    old, new = advice.group(1), advice.group(2).replace("REGISTRY", "registry.mycorp.io")
    digest = "sha256:" + "0123456789abcdef" * 4
    rel = os.path.relpath(K8S / "overlays" / overlay, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{rel}]\nimages:\n  - name: {old}\n    newName: {new}\n    digest: {digest}\n"
    )
    pinned = kustomize(tmp_path, f"{overlay}+digest")
    images = {c["image"] for w in pinned.workloads() for c in containers(w)}
    assert images == {f"{new}@{digest}"}, f"`set image {old}=...` left {sorted(images)}"


def test_model_volume_component(rendered: dict[str, Rendered]) -> None:
    r = rendered["cpu+model-volume"]
    model = r.config()["SAFETY_MODEL"]
    claim = r.get("PersistentVolumeClaim", "safety-model")
    for workload, container in ours(r):
        volumes = {v["name"]: v for v in pod(workload)["volumes"]}
        mounts = [m for m in container["volumeMounts"] if model.startswith(m["mountPath"].rstrip("/") + "/")]
        assert len(mounts) == 1, (
            f"{workload['metadata']['name']}: SAFETY_MODEL={model} is on no mounted volume"
        )
        assert mounts[0].get("readOnly") is True
        pvc = volumes[mounts[0]["name"]]["persistentVolumeClaim"]
        assert pvc["claimName"] == claim["metadata"]["name"] and pvc.get("readOnly") is True
    assert "SAFETY_MODEL" not in rendered["cpu"].config(), "by default the image's bundled model is served"
