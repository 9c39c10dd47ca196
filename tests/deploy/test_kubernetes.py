"""Kubernetes manifests (deploy/kubernetes): the example overlay builds with
kustomize, every object validates against the Kubernetes API schemas
(kubernetes-validate, offline, strict: unknown fields fail), and the objects
carry what running a ledger needs: probes, a migration Job, a disruption
budget, an autoscaler, resources, a locked-down securityContext and Secrets
for the DSN and keys."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

KUBERNETES = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
OVERLAY = KUBERNETES / "overlays" / "example"
# The oldest Kubernetes release the manifests are checked against (and so
# need): autoscaling/v2 and policy/v1 are GA there.
KUBERNETES_VERSION = "1.30.0"


def build(path: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build` (or kubectl's built-in kustomize) renders."""
    if kustomize := shutil.which("kustomize"):
        command = [kustomize, "build", str(path)]
    elif kubectl := shutil.which("kubectl"):
        command = [kubectl, "kustomize", str(path)]
    else:
        pytest.fail("neither kustomize nor kubectl is installed; one renders the overlay")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)  # noqa: S603  # why: fixed tool, our paths
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return build(OVERLAY)


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def test_every_object_matches_the_api_schema(objects: list[dict[str, Any]]) -> None:
    """kubernetes-validate (strict) accepts every rendered object, and refuses one
    with a misspelled field, so the check is real."""
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "Secret",
            "Secret",
            "Secret",
            "Service",
            "Deployment",
            "Job",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
        ]
    )
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    broken = copy.deepcopy(one(objects, "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_base_builds_and_validates() -> None:
    """The base alone renders valid objects too (an overlay adds the Secrets)."""
    for obj in build(KUBERNETES / "base"):
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_probes_and_lifecycle(objects: list[dict[str, Any]]) -> None:
    """Readiness asks /readyz, liveness /healthz; a schema check gates start-up and
    the migration is a Job running `tokenledger migrate`."""
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["serve"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert [c["args"] for c in pod["initContainers"]] == [["migrate", "--check"]]
    job = one(objects, "Job")["spec"]["template"]["spec"]
    assert [c["args"] for c in job["containers"]] == [["migrate"]]
    assert job["restartPolicy"] == "Never"
    image = "registry.example.com/platform/tokenledger:0.1.0"
    for c in pod["containers"] + pod["initContainers"] + job["containers"]:
        assert c["image"] == image


def test_every_container_is_locked_down(objects: list[dict[str, Any]]) -> None:
    """Every pod runs as a non-root user with a read-only root filesystem, no privilege
    escalation, no capabilities, resource requests and no service-account token."""
    pods = [one(objects, kind)["spec"]["template"]["spec"] for kind in ("Deployment", "Job")]
    for pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
            assert "memory" in c["resources"]["limits"], c["name"]


def test_secrets_hold_the_dsn_and_keys(objects: list[dict[str, Any]]) -> None:
    """The DSNs and the keys come from Secrets the overlay renders (by their hashed
    names), never from the ConfigMap; the migration Job logs in as the schema owner,
    the service as the least-privileged role."""
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    refs = [e["secretRef"]["name"] for e in pod["containers"][0]["envFrom"] if "secretRef" in e]
    assert set(refs) <= set(secrets), (refs, list(secrets))
    keys = {k for name in refs for k in secrets[name]["data"]}
    assert {
        "DATABASE_URL",
        "TOKENLEDGER_BOOTSTRAP_ADMIN_KEY",
        "TOKENLEDGER_JWT_HS256_SECRET",
    } <= keys
    job = one(objects, "Job")["spec"]["template"]["spec"]["containers"][0]
    (job_secret,) = [e["secretRef"]["name"] for e in job["envFrom"] if "secretRef" in e]
    assert job_secret.startswith("tokenledger-migrate-database"), job_secret
    assert "DATABASE_URL" in secrets[job_secret]["data"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["TOKENLEDGER_DB_ROLE"] == "tokenledger_app"
    config = one(objects, "ConfigMap")["data"]
    assert not any("KEY" in k or "SECRET" in k or k == "DATABASE_URL" for k in config), config
    assert config["TOKENLEDGER_ENVIRONMENT"] == "production"
    assert config["TOKENLEDGER_JWT_ISSUER"]


def test_service_budget_and_autoscaler_select_the_pods(objects: list[dict[str, Any]]) -> None:
    """The Service, the PodDisruptionBudget and the HPA point at the Deployment's pods."""
    deployment = one(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = one(objects, "Service")
    pdb = one(objects, "PodDisruptionBudget")
    hpa = one(objects, "HorizontalPodAutoscaler")
    for selector in (service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items(), (selector, labels)
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    assert pdb["spec"]["minAvailable"] == 1
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        "tokenledger"
    }
