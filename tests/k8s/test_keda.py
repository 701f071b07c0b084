"""The KEDA overlay's ScaledObject: its schema (strict, keda-scaledobject.schema.json) and what it says.

Owns: the custom resource kubernetes-validate cannot check. The HPA behaviour inside it is checked against
Kubernetes' own HPA schema; the Redis trigger against the Celery queue the workers consume and the Redis the
settings name. Must not know: anything of the built-in kinds beyond what the ScaledObject points at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
from kubernetes_validate.utils import validate as k8s_validate

from tests.k8s.render import Rendered
from worker.store import ACTIVE_JOBS

SCHEMA = json.loads((Path(__file__).parent / "keda-scaledobject.schema.json").read_text())
# Keys the KEDA redis (list) scaler reads; a literal `password` would put a secret in the manifest.
REDIS_SCALER_KEYS = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "usernameFromEnv",
    "passwordFromEnv", "databaseIndex", "enableTLS", "unsafeSsl", "listName", "listLength",
    "activationListLength",
}  # fmt: skip


@pytest.fixture(scope="module")
def keda(rendered: dict[str, Rendered]) -> Rendered:
    return rendered["keda"]


@pytest.fixture(scope="module")
def scaled(keda: Rendered) -> dict[str, Any]:
    return keda.get("ScaledObject", "safety-worker")


def test_scaledobject_matches_schema(scaled: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(scaled)


@pytest.mark.parametrize(
    ("path", "value"),
    [(("spec", "maxReplicas"), 3), (("spec", "triggers"), []), (("spec", "minReplicaCount"), "0")],
)
def test_schema_rejects_wrong_shapes(scaled: dict[str, Any], path: tuple[str, str], value: Any) -> None:
    bad = json.loads(json.dumps(scaled))
    bad[path[0]][path[1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(bad)


def test_hpa_behavior_is_valid_kubernetes(scaled: dict[str, Any]) -> None:
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "probe"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
            "maxReplicas": 1,
            "behavior": behavior,
        },
    }
    k8s_validate(hpa, "1.37", strict=True)


def test_targets_the_worker_deployment(keda: Rendered, scaled: dict[str, Any]) -> None:
    ref = scaled["spec"]["scaleTargetRef"]
    assert (ref.get("apiVersion", "apps/v1"), ref.get("kind", "Deployment")) == ("apps/v1", "Deployment")
    target = keda.get("Deployment", ref["name"])
    assert target["spec"]["template"]["spec"]["containers"][0]["args"][0] == "worker"
    assert scaled["metadata"]["namespace"] == target["metadata"]["namespace"]
    # KEDA owns the worker's HPA: a second HPA on the same Deployment would fight it.
    hpas = [
        h
        for h in keda.of_kind("HorizontalPodAutoscaler")
        if h["spec"]["scaleTargetRef"]["name"] == ref["name"]
    ]
    assert not hpas, f"an HPA also targets {ref['name']}: {[h['metadata']['name'] for h in hpas]}"
    spec = scaled["spec"]
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]


def test_redis_triggers_read_the_worker_queue_and_the_open_jobs(
    keda: Rendered, scaled: dict[str, Any]
) -> None:
    """The queue sizes the workers; the open-jobs list keeps one while any job is unfinished, so a chunk lost
    with its worker (in the broker's unacked hash, not the queue) is still restored or re-sent."""
    config = keda.config()
    queue, open_jobs = scaled["spec"]["triggers"]
    assert queue["metadata"]["listName"] == config["SAFETY_QUEUE"], (
        "KEDA must watch the queue the workers consume"
    )
    assert open_jobs["metadata"]["listName"] == ACTIVE_JOBS
    assert int(open_jobs["metadata"]["listLength"]) >= 100_000  # one replica from this trigger, never more
    url = urlsplit(config["SAFETY_REDIS_URL"])
    namespace = scaled["metadata"]["namespace"]
    for trigger in (queue, open_jobs):
        assert trigger["type"] == "redis"
        meta = trigger["metadata"]
        assert set(meta) <= REDIS_SCALER_KEYS, f"unknown redis scaler keys: {set(meta) - REDIS_SCALER_KEYS}"
        assert int(meta["listLength"]) >= 1 and int(meta.get("activationListLength", "0")) == 0
        host, _, port = meta["address"].rpartition(":")
        # The settings use the in-namespace short name; KEDA runs in its own namespace and needs the FQDN.
        assert host in (f"{url.hostname}.{namespace}.svc.cluster.local", f"{url.hostname}.{namespace}.svc")
        assert int(port) == (url.port or 6379)
        assert meta.get("databaseIndex", "0") == (url.path.strip("/") or "0")
