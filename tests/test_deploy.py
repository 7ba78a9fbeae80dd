"""deploy/: the serve config passes Ray's own schema, the RayService embeds the same applications, keeps
the job store on the head pod's own volume and comes with a NetworkPolicy for Ray's ports, the Dockerfile
installs the package, and the Grafana dashboard queries metrics the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_serve_config_matches_rays_schema_and_the_builder():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    app = schema.applications[0]
    assert app.import_path == "longtake.serve.deployments:app_builder"
    import importlib

    module, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"Ingress", "Manager", "Denoiser"}  # serve/routes.py, serve/deployments.py
    denoiser = deployments["Denoiser"]
    assert denoiser.autoscaling_config["min_replicas"] == 0
    assert denoiser.ray_actor_options.num_gpus == 1
    from longtake.serve.manager import Limits

    unknown = set(app.args) - set(Limits.__dataclass_fields__) - {"model", "data_dir", "device", "min_replicas",
                                                                   "max_replicas", "downscale_delay_s", "allowed_hosts"}
    assert not unknown


def test_rayservice_embeds_the_serve_config_with_autoscaled_gpu_workers():
    from ray.serve.schema import ServeDeploySchema

    service = manifests()["RayService"]
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert embedded["applications"] == yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())["applications"]
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"  # a CPU head
    (gpu,) = cluster["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    env = gpu["template"]["spec"]["containers"][0]["env"]
    assert {"name": "LONGTAKE_API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "longtake-api", "key": "token"}}} in env


def manifests() -> dict:
    """rayservice.yaml's documents by kind."""
    docs = list(yaml.safe_load_all((DEPLOY / "rayservice.yaml").read_text()))
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs)
    return by_kind


def test_the_job_store_is_on_the_head_pods_own_volume():
    """SQLite's WAL needs memory shared by the processes of one machine: the data dir (job store, uploads,
    videos) is a ReadWriteOnce volume of the head pod only, and the deployments that touch it run there."""
    docs = manifests()
    service, claim = docs["RayService"], docs["PersistentVolumeClaim"]
    cluster = service["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    (data,) = [v for v in head["template"]["spec"]["volumes"] if v.get("persistentVolumeClaim")]
    assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    mounts = [m["mountPath"] for m in head["template"]["spec"]["containers"][0]["volumeMounts"]
              if m["name"] == data["name"]]
    assert len(mounts) == 1 and Path(app["args"]["data_dir"]).parent == Path(mounts[0])  # a directory in it
    for group in cluster["workerGroupSpecs"]:  # no worker mounts it, or any shared volume
        spec = group["template"]["spec"]
        assert not spec.get("volumes") and not any(c.get("volumeMounts") for c in spec["containers"])
    # Ingress and Manager (the deployments given data_dir) need a resource only the head has
    head_resources = json.loads(json.loads(head["rayStartParams"]["resources"]))
    for d in app["deployments"]:
        wants = set(d["ray_actor_options"].get("resources", {}))
        if d["name"] in ("Ingress", "Manager"):
            assert wants == {"longtake_data"} and head_resources["longtake_data"] >= 2
        for group in cluster["workerGroupSpecs"]:
            assert not wants & set(json.loads(json.loads(group["rayStartParams"].get("resources", '"{}"'))))


def test_only_the_clusters_pods_reach_rays_ports():
    docs = manifests()
    policy, cluster = docs["NetworkPolicy"], docs["RayService"]["spec"]["rayClusterConfig"]
    assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["spec"]["policyTypes"] == ["Ingress"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
        assert selector.items() <= template["metadata"]["labels"].items()  # every Ray pod is isolated by it
    operator = {"app.kubernetes.io/name": "kuberay-operator"}

    def who_reaches(port: int) -> list:
        """The sources of the rules that let `port` in: "anyone", or the pod labels they select."""
        sources = []
        for rule in policy["spec"]["ingress"]:
            if "ports" in rule and port not in [p["port"] for p in rule["ports"]]:
                continue
            if not rule.get("from"):
                sources.append("anyone")
            for peer in rule.get("from", []):
                assert set(peer) <= {"podSelector", "namespaceSelector"}  # no ipBlock
                sources.append(peer["podSelector"]["matchLabels"] if "podSelector" in peer else "anyone")
        return sources

    for port in (6379, 10001):
        assert who_reaches(port) == [selector]
    assert who_reaches(8265) == [selector, operator]  # the operator deploys the serve config through it
    assert "anyone" in who_reaches(8000)  # the API: bearer token on every /v1 route
    for rule in policy["spec"]["ingress"]:
        if selector in [p.get("podSelector", {}).get("matchLabels") for p in rule.get("from", [])]:
            assert "namespaceSelector" not in rule["from"][0]  # this namespace's pods only


def test_dockerfile_installs_the_package():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:\S+gpu", text, re.M)
    assert "pip install" in text and "COPY longtake" in text


def test_grafana_dashboard_uses_exported_metrics(tmp_path):
    from longtake.serve.manager import JobManager

    manager = JobManager(tmp_path, pool=None, model="tiny")
    try:
        exported = set(re.findall(r"^# TYPE (\w+) ", manager.metrics().decode(), re.M))
    finally:
        manager.close()
    dash = json.loads((DEPLOY / "grafana_dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"longtake_\w+", e)}
    base = {re.sub(r"_(bucket|total)$", "", m) for m in used}
    assert base <= {re.sub(r"_total$", "", m) for m in exported}, base - exported
    for metric in ("longtake_jobs", "longtake_job_duration_seconds", "longtake_window_step_seconds",
                   "longtake_queue_jobs", "longtake_queue_windows", "longtake_workers_busy", "longtake_workers_idle",
                   "longtake_frames_rendered", "longtake_worker_utilisation", "longtake_worker_window_steps",
                   "longtake_worker_bytes"):
        assert metric in base
