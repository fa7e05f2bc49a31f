"""deploy/k8s: every object validates against the real Kubernetes schemas, and the objects fit together.

Core objects (Namespace, ConfigMap, Deployment, Service, HorizontalPodAutoscaler) are validated with
kubernetes-validate, which bundles the Kubernetes JSON schemas and works offline, in strict mode (unknown
fields are errors) for the oldest and newest Kubernetes versions it ships. The ServiceMonitor is validated
against tests/deploy/schemas/servicemonitor-monitoring-v1.json, generated from the Prometheus Operator's
CRD models of the cloudcoil-models-prometheus-operator package (see make_servicemonitor_schema.py). The
prometheus-adapter rules are checked structurally (no schema exists for them). `kubectl kustomize`
renders the kustomization when kubectl is installed.

kubernetes-validate is a test dependency: without it these tests skip, or fail under
LANNER_REQUIRE_DEPLOY_TOOLS=1.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import require_tool
from tests.deploy.test_compose import CACHE_IN_IMAGE, dockerfile, read_settings_env_names, stage_values

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
SM_SCHEMA = Path(__file__).with_name("schemas") / "servicemonitor-monitoring-v1.json"
HPA_METRIC = "lanner_num_requests_waiting"


def require_module(name: str):
    try:
        return __import__(name)
    except ImportError:
        msg = f"python package {name} is not installed (pip install kubernetes-validate)"
        if os.environ.get("LANNER_REQUIRE_DEPLOY_TOOLS") == "1":
            pytest.fail(msg + "; LANNER_REQUIRE_DEPLOY_TOOLS=1 requires it", pytrace=False)
        pytest.skip(msg)


def load_manifests() -> list[dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = kustomization["resources"]
    assert sorted(files) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"), \
        "every manifest in deploy/k8s is listed in kustomization.yaml"
    return [d for f in files for d in yaml.safe_load_all((K8S / f).read_text()) if d]


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    return load_manifests()


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, (kind, [d["kind"] for d in docs])
    return found[0]


def servicemonitor_errors(doc: dict) -> list[str]:
    jsonschema = require_module("jsonschema")
    validator = jsonschema.Draft202012Validator(json.loads(SM_SCHEMA.read_text()))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def validate_all(docs: list[dict]) -> list[str]:
    """Validate every object; return 'kind/name' of those validated."""
    kv = require_module("kubernetes_validate")
    from kubernetes_validate.utils import all_versions

    versions = sorted(set(all_versions()), key=lambda v: tuple(map(int, v.split("."))))
    done = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            assert doc["kind"] == "ServiceMonitor", name
            errors = servicemonitor_errors(doc)
            assert not errors, f"{name}: {errors}"
        else:
            for version in (versions[0], versions[-1]):
                try:
                    kv.validate(doc, version, strict=True)
                except kv.ValidationError as e:
                    pytest.fail(f"{name} is invalid for Kubernetes {version}: {'.'.join(map(str, e.path))}: "
                                f"{e.message}", pytrace=False)
        done.append(name)
    return done


def test_every_object_validates_against_its_schema(manifests):
    done = validate_all(manifests)
    kinds = ["Namespace", "ConfigMap", "ConfigMap", "Deployment", "Service", "ServiceMonitor",
             "HorizontalPodAutoscaler"]
    assert sorted(d.split("/")[0] for d in done) == sorted(kinds)


def test_the_validators_catch_mistakes(manifests):
    """The schemas in use are strict enough to matter: a typo, a wrong type, a missing field fail."""
    kv = require_module("kubernetes_validate")
    require_module("jsonschema")
    deployment = copy.deepcopy(one(manifests, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}  # typo
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, "1.37", strict=True)
    hpa = copy.deepcopy(one(manifests, "HorizontalPodAutoscaler"))
    hpa["spec"]["maxReplicas"] = "eight"
    with pytest.raises(kv.ValidationError):
        kv.validate(hpa, "1.37", strict=True)
    for mutate in (lambda sm: sm["spec"]["endpoints"][0].update(intervall="15s"),
                   lambda sm: sm["spec"]["endpoints"][0].update(interval="15 seconds"),
                   lambda sm: sm["spec"].pop("selector")):
        sm = copy.deepcopy(one(manifests, "ServiceMonitor"))
        mutate(sm)
        assert servicemonitor_errors(sm)


def test_kustomize_renders_valid_objects():
    kubectl = require_tool("kubectl")
    r = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rendered = [d for d in yaml.safe_load_all(r.stdout) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == \
        sorted((d["kind"], d["metadata"]["name"]) for d in load_manifests())
    validate_all(rendered)
    container = one(rendered, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "lanner:local"  # the kustomization's `images` entry applies
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "lanner" for d in rendered)


def test_deployment_runs_the_image_as_built(manifests):
    deployment = one(manifests, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert "replicas" not in spec, "the HPA owns the replica count"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()

    # the image's entrypoint, port, user and cache volume
    _, stages = dockerfile()
    final = stages[-1]
    assert c["args"] == json.loads(stage_values(final, "CMD")[0])
    assert c["ports"][0]["containerPort"] == int(stage_values(final, "EXPOSE")[0])
    uid = stage_values(final, "USER")[-1].split(":")[0]
    assert pod["securityContext"]["runAsNonRoot"] is True and str(pod["securityContext"]["runAsUser"]) == uid
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts[CACHE_IN_IMAGE] == "cache" and "/tmp" in mounts  # the only writable paths
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts.values()) <= set(volumes)
    assert all("emptyDir" in volumes[n] or "persistentVolumeClaim" in volumes[n] for n in mounts.values())

    # probes: readiness /ready, liveness /health, a startup probe that allows a slow first load
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] == c["ports"][0]["name"]

    # Guaranteed QoS with whole cores (exclusive under the static CPU manager); LANNER_CPUS unset
    res = c["resources"]
    assert res["requests"] == res["limits"]
    assert set(res["limits"]) == {"cpu", "memory"} and re.fullmatch(r"[1-9]\d*", str(res["limits"]["cpu"]))

    # drain: uvicorn's graceful shutdown must finish inside the grace period
    from app.config import Settings

    assert pod["terminationGracePeriodSeconds"] > Settings.model_fields["drain_timeout"].default


def test_deployment_env_is_what_lanner_reads(manifests):
    deployment = one(manifests, "Deployment")
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    (ref,) = c["envFrom"]
    config = next(d for d in manifests
                  if d["kind"] == "ConfigMap" and d["metadata"]["name"] == ref["configMapRef"]["name"])
    assert config["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    names = set(config["data"]) | {e["name"] for e in c.get("env", [])}
    known = read_settings_env_names()
    assert names <= known, f"not read by `lanner serve`: {names - known}"
    assert "LANNER_CPUS" not in names, "pinning comes from the CPU manager's cpuset"
    assert all(v != "" for v in config["data"].values()), "an empty value is read as a setting"
    (key,) = [e for e in c["env"] if e["name"] == "LANNER_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"]["optional"] is True


def test_service_and_servicemonitor_select_the_pods(manifests):
    deployment, service, sm = (one(manifests, k) for k in ("Deployment", "Service", "ServiceMonitor"))
    ns = deployment["metadata"]["namespace"]
    assert service["metadata"]["namespace"] == ns == one(manifests, "Namespace")["metadata"]["name"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert port["targetPort"] in container_ports
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert ns in sm["spec"]["namespaceSelector"]["matchNames"]
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"


def test_hpa_scales_on_the_adapter_metric(manifests):
    hpa, deployment = one(manifests, "HorizontalPodAutoscaler"), one(manifests, "Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == HPA_METRIC
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]

    # prometheus-adapter serves exactly that name, per pod, from the metric Lanner exports
    adapter = next(d for d in manifests if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {}))
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    (rule,) = [r for r in rules if r["name"]["as"] == HPA_METRIC]
    assert re.match(rf"^{HPA_METRIC}\{{", rule["seriesQuery"])
    assert re.fullmatch(rule["name"]["matches"], HPA_METRIC)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                              "pod": {"resource": "pod"}}
    q = rule["metricsQuery"]
    assert all(t in q for t in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>")) and q.startswith("sum")
    # the metric exists (docs/metrics.md is the reference, app/metrics.py defines it)
    assert f"`{HPA_METRIC}`" in (ROOT / "docs" / "metrics.md").read_text()
    assert f'"{HPA_METRIC}"' in (ROOT / "app" / "metrics.py").read_text()
