"""deploy/: the serve config passes Ray's own schema, the RayService embeds the same applications,
the Dockerfile installs the package, and the Grafana dashboard queries metrics the server exports."""

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
    assert app.import_path == "longtake.serve.app:app_builder"
    import importlib

    module, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"Ingress", "Manager", "Denoiser"}  # the names in longtake/serve/app.py
    denoiser = deployments["Denoiser"]
    assert denoiser.autoscaling_config["min_replicas"] == 0
    assert denoiser.ray_actor_options.num_gpus == 1
    from longtake.serve.manager import Limits

    unknown = set(app.args) - set(Limits.__dataclass_fields__) - {"model", "data_dir", "device", "min_replicas",
                                                                   "max_replicas", "downscale_delay_s"}
    assert not unknown


def test_rayservice_embeds_the_serve_config_with_autoscaled_gpu_workers():
    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
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
                   "longtake_frames_rendered"):
        assert metric in base
