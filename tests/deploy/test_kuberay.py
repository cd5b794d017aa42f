"""The KubeRay deployment (deploy/kuberay/) agrees with the code, checked statically as the compose file
is: no Kubernetes and no Ray needed. The Serve application it names exists, its args are settings, every
E2VPT_* variable is one the code reads, secrets come from files, one GPU per engine replica, and the Ray
version is the one the `ray` extra pins."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import tomllib
import yaml

from e2vpt.config import Settings, env_names, settings_with_defaults
from tests.cli_helpers import DEPLOY, ROOT

KUBERAY = DEPLOY / "kuberay"
RAYSERVICE = KUBERAY / "rayservice.yaml"
DOCKERFILE = KUBERAY / "Dockerfile.ray"


def rayservice() -> dict[str, Any]:
    return yaml.safe_load(RAYSERVICE.read_text())


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(rayservice()["spec"]["serveConfigV2"])


def containers() -> list[dict[str, Any]]:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def ray_pin() -> str:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (req,) = extras["ray"]
    match = re.fullmatch(r"ray\[serve\]==([\w.]+)", req)
    assert match, req
    return match.group(1)


def test_it_is_a_rayservice_on_the_pinned_ray() -> None:
    doc = rayservice()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    assert doc["spec"]["rayClusterConfig"]["rayVersion"] == ray_pin()
    for c in containers():
        assert c["image"].endswith(f":{ray_pin()}"), c["image"]
    text = DOCKERFILE.read_text()
    assert "pip install '.[ray]'" in text  # the image gets ray from the extra: one pin


def test_the_application_exists_and_its_args_are_settings() -> None:
    (app,) = serve_config()["applications"]
    module, _, func = app["import_path"].partition(":")
    path = ROOT / Path(*module.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text())
    builder = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func)
    assert [a.arg for a in builder.args.args] == ["args"]  # Serve passes the `args` mapping
    args = app["args"]
    assert set(args) <= set(Settings.model_fields), set(args) - set(Settings.model_fields)
    settings = settings_with_defaults(args)
    assert settings.ray_max_replicas > settings.ray_min_replicas >= 1  # autoscaled
    assert settings.ray_affinity
    assert app["route_prefix"] == "/"


def test_every_variable_is_a_setting_and_secrets_come_from_files() -> None:
    known = env_names()
    for c in containers():
        env = {e["name"]: e for e in c["env"]}
        unknown = [n for n in env if n not in known]
        assert not unknown, unknown
        assert "E2VPT_INFERENCE_TOKEN" not in env  # the token only as a mounted secret file
        assert "value" not in env["E2VPT_REDIS_URL"]  # the password lives in a Secret
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert str(Path(env["E2VPT_INFERENCE_TOKEN_FILE"]["value"]).parent) in mounts
        assert env["E2VPT_DEVICE"]["value"] == "cuda"


def test_one_gpu_per_engine_replica_and_room_to_scale() -> None:
    cluster = rayservice()["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no replica on the head
    settings = settings_with_defaults(serve_config()["applications"][0]["args"])
    (gpu,) = cluster["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1
    assert float(limits["cpu"]) >= settings.ray_replica_cpus
    assert gpu["maxReplicas"] >= settings.ray_max_replicas  # a pod (one GPU) for every replica
    assert gpu["minReplicas"] <= settings.ray_min_replicas


def test_serve_listens_on_every_pod_and_metrics_are_exported() -> None:
    cfg = serve_config()
    assert cfg["http_options"]["host"] == "0.0.0.0" and cfg["proxy_location"] == "EveryNode"
    cluster = rayservice()["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        port = group["rayStartParams"]["metrics-export-port"]
        ports = {p["containerPort"] for c in group["template"]["spec"]["containers"] for p in c["ports"]}
        assert int(port) in ports
