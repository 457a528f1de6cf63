"""Kubernetes manifests for one ember model server, rendered from its config (`ember deploy kubernetes CONFIG`):
a ConfigMap holding the config, a Deployment and a Service. The Deployment's resource requests come from the
config's `resources` (cpu, memory, `accelerator: H100:4` -> 4 `nvidia.com/gpu`), its probes read `/health`,
and its shutdown matches ember's SIGTERM drain: a preStop pause lets Services and gateways stop sending new
requests, then SIGTERM drains in-flight ones for `ember.drain_timeout_s`, all inside
terminationGracePeriodSeconds. deploy/kubernetes/ holds these for the default model, beside the autoscaling
(HPA, KEDA) and Gateway API Inference Extension (InferencePool, endpoint picker, HTTPRoute) examples."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from ember.config import ConfigError, EngineConfig, parse_config

PORT = 8000
CONFIG_DIR = "/etc/ember"
PRESTOP_S = 10  # endpoints and gateways drop a terminating pod within this, before SIGTERM starts the drain
GRACE_MARGIN_S = 15  # after the drain: engine shutdown and process exit


@dataclass
class DeploySpec:
    """What the manifests name and run, besides the config."""

    name: str = "ember"  # Deployment, Service and ConfigMap name; the pods' `app` label
    image: str = "ember:0.1.0"  # an image with ember installed (`make setup` in it), `ember` on PATH
    replicas: int = 1


def gpu_count(cfg: EngineConfig) -> int:
    """GPUs one replica needs: `accelerator: H100:4` -> 4, `H100` or `use_gpu: true` -> 1, else 0."""
    acc = cfg.resources.accelerator
    if acc:
        _, sep, count = acc.partition(":")
        if sep and not count.isdigit():
            raise ConfigError(f"resources.accelerator: {acc!r} is not TYPE or TYPE:COUNT (e.g. H100:4)")
        return int(count) if sep else 1
    return 1 if cfg.resources.use_gpu else 0


def resources(cfg: EngineConfig) -> dict:
    """The container's requests (and a GPU limit, which Kubernetes requires equal to the request)."""
    requests = {k: str(v) for k, v in (("cpu", cfg.resources.cpu), ("memory", cfg.resources.memory)) if v is not None}
    gpus = gpu_count(cfg)
    out: dict = {"requests": requests}
    if gpus:
        requests["nvidia.com/gpu"] = str(gpus)
        out["limits"] = {"nvidia.com/gpu": str(gpus)}
    return out


def termination_grace_s(cfg: EngineConfig) -> int:
    return PRESTOP_S + math.ceil(cfg.ember.drain_timeout_s) + GRACE_MARGIN_S


def render(config_text: str, spec: DeploySpec = DeploySpec()) -> dict[str, list[dict]]:
    """{file name: [manifest]} for a config given as YAML text (validated against the schema only: the
    checkpoint is read where the pod runs, not here)."""
    cfg = parse_config(yaml.safe_load(config_text) or {})
    labels = {"app": spec.name, "app.kubernetes.io/name": "ember", "app.kubernetes.io/instance": spec.name}
    health = {"httpGet": {"path": "/health", "port": "http"}}
    container = {
        "name": "ember",
        "image": spec.image,
        "command": ["ember", "serve", f"{CONFIG_DIR}/config.yaml", "--host", "0.0.0.0", "--port", str(PORT)],
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "resources": resources(cfg),
        # loading weights (and compiling) can take minutes: liveness and readiness start once this passes
        "startupProbe": {**health, "periodSeconds": 5, "failureThreshold": 120},
        # /health is 503 while draining and once the engine died: out of the Service at once ...
        "readinessProbe": {**health, "periodSeconds": 5, "failureThreshold": 1},
        # ... and restarted when it stays down (a dead engine also makes the process exit)
        "livenessProbe": {**health, "periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": 5},
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", f"sleep {PRESTOP_S}"]}}},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}],
    }
    if cfg.ember.api_key:
        raise ConfigError("ember.api_key: keep the key out of a ConfigMap; set EMBER_API_KEY from a Secret instead")
    pod = {"metadata": {"labels": labels,
                        "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT),
                                        "prometheus.io/path": "/metrics"}},
           "spec": {"terminationGracePeriodSeconds": termination_grace_s(cfg), "containers": [container],
                    "volumes": [{"name": "config", "configMap": {"name": f"{spec.name}-config"}}]}}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": spec.name, "labels": labels},
                  "spec": {"replicas": spec.replicas, "selector": {"matchLabels": {"app": spec.name}},
                           "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                           "template": pod}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": spec.name, "labels": labels},
               "spec": {"selector": {"app": spec.name}, "ports": [{"name": "http", "port": PORT, "targetPort": "http"}]}}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{spec.name}-config", "labels": labels},
                  "data": {"config.yaml": config_text}}
    return {"configmap.yaml": [config_map], "deployment.yaml": [deployment], "service.yaml": [service]}


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # a manifest spells every value out (no &id001 anchors)
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)  # the config in the ConfigMap reads as the file it came from


def dump(docs: list[dict]) -> str:
    return "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False) for d in docs)


def write(config_path: str, out_dir: str, spec: DeploySpec = DeploySpec()) -> list[Path]:
    """Render `config_path` into `out_dir`; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = f"# rendered by `ember deploy kubernetes {Path(config_path).name}`; edit the config and render again\n"
    written = []
    for file_name, docs in render(Path(config_path).read_text(), spec).items():
        (out / file_name).write_text(header + dump(docs))
        written.append(out / file_name)
    return written
