"""deploy/kubernetes validated offline, as no cluster runs here: core kinds against Kubernetes' own schemas
(kubernetes-validate, strict: an unknown field fails), custom resources (InferencePool, KEDA ScaledObject,
HTTPRoute) against their CRDs' OpenAPI schemas vendored in deploy/kubernetes/schemas (jsonschema, with unknown
fields refused as the API server's strict field validation does). Also: the rendered files are what
`ember deploy kubernetes` makes of the config beside them, and the pieces point at each other."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ember.cli import main as ember_main
from ember.config import ConfigError
from ember.deploy.kubernetes import PRESTOP_S, DeploySpec, dump, gpu_count, render, resources

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
K8S_VERSION = "1.37"
CRD_SCHEMAS = {  # (apiVersion, kind) -> vendored openAPIV3Schema
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-inference.networking.k8s.io-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-gateway.networking.k8s.io-v1.json",
}


def manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "ember-config.yaml":  # an ember config, not a manifest
            continue
        out += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return out


def strict(schema):
    """An object schema with listed properties refuses others, unless it keeps unknown fields."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    return [strict(v) for v in schema] if isinstance(schema, list) else schema


def validate(doc: dict) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        schema = strict(json.loads((DEPLOY / "schemas" / CRD_SCHEMAS[key]).read_text()))
        jsonschema.Draft7Validator(schema).validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def by_kind(kind: str, name: str) -> dict:
    [doc] = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize("file_name,doc", manifests(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_is_valid(file_name, doc):
    validate(doc)


def test_every_kind_is_there():
    kinds = {d["kind"] for _, d in manifests()}
    assert {"ConfigMap", "Deployment", "Service", "HorizontalPodAutoscaler", "ScaledObject", "InferencePool",
            "HTTPRoute", "ServiceAccount", "Role", "RoleBinding"} <= kinds


def test_validators_refuse_broken_manifests():
    """Each validator can fail: a wrong type, a missing required field, an unknown field."""
    pool = copy.deepcopy(by_kind("InferencePool", "ember-pool"))
    pool["spec"]["targetPorts"][0]["number"] = "8000"
    with pytest.raises(jsonschema.ValidationError):
        validate(pool)
    scaled = copy.deepcopy(by_kind("ScaledObject", "ember"))
    del scaled["spec"]["scaleTargetRef"]
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)
    route = copy.deepcopy(by_kind("HTTPRoute", "ember"))
    route["spec"]["rules"][0]["backendRef"] = route["spec"]["rules"][0].pop("backendRefs")
    with pytest.raises(jsonschema.ValidationError):
        validate(route)
    deployment = copy.deepcopy(by_kind("Deployment", "ember"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def test_rendered_files_match_the_config(tmp_path):
    assert ember_main(["deploy", "kubernetes", str(DEPLOY / "ember-config.yaml"), "-o", str(tmp_path)]) == 0
    for name in ("configmap.yaml", "deployment.yaml", "service.yaml"):
        assert (tmp_path / name).read_text() == (DEPLOY / name).read_text(), f"render deploy/kubernetes/{name} again"


def test_deployment_probes_drain_and_resources():
    config = yaml.safe_load((DEPLOY / "ember-config.yaml").read_text())
    pod = by_kind("Deployment", "ember")["spec"]["template"]["spec"]
    [c] = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["lifecycle"]["preStop"]["exec"]["command"][-1] == f"sleep {PRESTOP_S}"
    # Kubernetes kills the pod at terminationGracePeriodSeconds, counted from the start of preStop
    assert pod["terminationGracePeriodSeconds"] > PRESTOP_S + config["ember"]["drain_timeout_s"]
    assert c["resources"]["requests"] == {"cpu": config["resources"]["cpu"], "memory": config["resources"]["memory"]}


def test_gpu_resources_from_the_config():
    text = "resources: {accelerator: 'H100:4', cpu: 16, memory: 128Gi}\nember: {drain_timeout_s: 120}\n"
    deployment = render(text, DeploySpec(name="big", replicas=3))["deployment.yaml"][0]
    validate(deployment)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {"requests": {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "4"},
                                                 "limits": {"nvidia.com/gpu": "4"}}
    assert pod["terminationGracePeriodSeconds"] > PRESTOP_S + 120 and deployment["spec"]["replicas"] == 3
    assert yaml.safe_load(dump([deployment])) == deployment
    from ember.config import parse_config

    assert gpu_count(parse_config({"resources": {"use_gpu": True}})) == 1
    assert resources(parse_config({})) == {"requests": {}}
    with pytest.raises(ConfigError, match="resources.accelerator"):
        render("resources: {accelerator: 'H100:four'}\n")
    with pytest.raises(ConfigError, match="ember.api_key"):
        render("ember: {api_key: secret}\n")


def test_gateway_pieces_point_at_each_other():
    deployment, service = by_kind("Deployment", "ember"), by_kind("Service", "ember")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    port = container["ports"][0]["containerPort"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pool = by_kind("InferencePool", "ember-pool")
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pool["spec"]["targetPorts"] == [{"number": port}]
    epp_service = by_kind("Service", pool["spec"]["endpointPickerRef"]["name"])
    assert epp_service["spec"]["ports"][0]["port"] == pool["spec"]["endpointPickerRef"]["port"]["number"]
    epp = by_kind("Deployment", "ember-epp")
    assert epp_service["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    assert epp["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= \
        deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    [rule] = by_kind("HTTPRoute", "ember")["spec"]["rules"]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "ember-pool"}]
    for scaler in (by_kind("HorizontalPodAutoscaler", "ember"), by_kind("ScaledObject", "ember")):
        assert scaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "vllm:num_requests_waiting" in by_kind("ScaledObject", "ember")["spec"]["triggers"][0]["metadata"]["query"]


def test_endpoint_picker_reads_the_metrics_ember_exports():
    """Every metric flag of the EPP names a family a live /metrics has (from the server's own collector)."""
    from prometheus_client.parser import text_string_to_metric_families

    from ember.engine.messages import EngineStats
    from ember.server.metrics import ServerMetrics

    class Engine:
        served_model_name = "smollm2"

        def is_healthy(self):
            return True

        def stats(self):
            return EngineStats(num_running=1, num_waiting=2, kv_cache_usage=0.5, max_loras=4, running_lora_names=("sql",))

    families = {f.name for f in text_string_to_metric_families(ServerMetrics(Engine()).render().decode())}
    args = by_kind("Deployment", "ember-epp")["spec"]["template"]["spec"]["containers"][0]["args"]
    flags = dict(zip(args[::2], args[1::2]))
    for flag in ("--total-queued-requests-metric", "--total-running-requests-metric",
                 "--kv-cache-usage-percentage-metric", "--lora-info-metric", "--cache-info-metric"):
        assert flags[flag] in families, flag
    assert flags["--model-server-metrics-path"] == "/metrics"
