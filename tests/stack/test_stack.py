"""The production stack agrees with the code: docker-compose.yml, deploy/ (Dockerfiles, Prometheus,
Grafana, env example), the entrypoint scripts, the README's configuration table and `make bench`'s
summarizer. No Docker engine runs here; `docker compose config` is used when a client can run it."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from e2vpt.cli import build_parser
from e2vpt.config import Settings, env_names
from e2vpt.registry.api import RegistryMetrics
from e2vpt.serving.metrics import ServingMetrics

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
ENV_EXAMPLE = DEPLOY / ".env.example"
INFERENCE_SERVICES = ("torchserve-gpu", "torchserve-cpu")
# Variables that are not e2vpt settings, and the services allowed to use them.
FOREIGN_ENV = {"REDIS_PASSWORD": {"redis"}, "GF_": {"grafana"}}


# ---------------------------------------------------------------------------------------------- helpers
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def read_env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def service_env(name: str) -> dict[str, str]:
    """What the service's container sees: its env files (from the .example) overlaid by `environment`."""
    svc = services()[name]
    env: dict[str, str] = {}
    for env_file in svc.get("env_file", []):
        env.update(read_env_file(ROOT / f"{env_file}.example"))
    environment = svc.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({k: str(v) for k, v in environment.items()})
    return env


def settings_for(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key in list(os.environ):
        if key.startswith("E2VPT_") or key == "REDIS_URL":
            monkeypatch.delenv(key)
    for key, value in env.items():
        if key in env_names():
            monkeypatch.setenv(key, value)
    return Settings(_env_file=None)


def port_mappings(svc: dict[str, Any]) -> list[tuple[str | None, int, int]]:
    """(host_ip or None, host_port, container_port) for each short-syntax port mapping."""
    out: list[tuple[str | None, int, int]] = []
    for spec in svc.get("ports", []):
        parts = str(spec).split(":")
        assert len(parts) in (2, 3), f"use HOST:CONTAINER or IP:HOST:CONTAINER, got {spec!r}"
        ip = parts[0] if len(parts) == 3 else None
        out.append((ip, int(parts[-2]), int(parts[-1].split("/")[0])))
    return out


def dockerfile_for(svc: dict[str, Any]) -> Path:
    build = svc["build"]
    return ROOT / build["context"] / build["dockerfile"]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def cli_commands(text: str) -> list[list[str]]:
    """Every `python -m e2vpt.cli ...` / `"$PYTHON" -m e2vpt.cli ...` invocation in a script, as argv:
    the plain words after the module, up to the first shell syntax (quote, `)`, `;`, `|`, `&`, `#`)."""
    out = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for match in re.finditer(r"-m e2vpt\.cli((?:[ \t]+[A-Za-z0-9_./=:@+-]+)*)", line):
            out.append(match.group(1).split())
    return out


def assert_cli_parses(argv: list[str]) -> None:
    """The real CLI parser accepts argv (subcommands exist, options are known)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse error
        raise AssertionError(f"`e2vpt {' '.join(argv)}` is not a valid command") from exc
    assert getattr(args, "func", None), f"`e2vpt {' '.join(argv)}` names no runnable command"


def exported_metric_names(registries: list[CollectorRegistry]) -> set[str]:
    """Every series name the collectors can expose (counter -> _total/_created, histogram -> _bucket ...)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created", ""),
        "gauge": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    for registry in registries:
        for family in registry.collect():
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or"}
PROMQL_WORDS |= {"unless", "inf", "nan", "le"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are neither functions, keywords, label
    matchers (inside {}), grouping labels (by/without (...)) nor range durations ([...])."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r'"[^"]*"', "", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word = match.group(0)
        following = expr[match.end() :].lstrip()[:1]
        if following == "(" or word.lower() in PROMQL_WORDS or word.startswith("$"):
            continue
        if match.start() > 0 and expr[match.start() - 1] in "$.0123456789":
            continue
        names.add(word)
    return names


def dashboard_exprs() -> list[str]:
    exprs = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            exprs += [t["expr"] for t in panel.get("targets", [])]
    return exprs


# ------------------------------------------------------------------------------------------ compose file
def test_compose_has_the_stack() -> None:
    svcs = services()
    assert {"redis", "registry", "prometheus", "grafana", *INFERENCE_SERVICES} <= set(svcs)
    assert svcs["torchserve-gpu"]["profiles"] == ["gpu"]
    assert svcs["torchserve-cpu"]["profiles"] == ["cpu"]


def test_every_service_restarts_and_has_a_healthcheck() -> None:
    for name, svc in services().items():
        assert svc.get("restart") in ("unless-stopped", "always"), name
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"


def test_redis_is_persistent_and_password_protected(monkeypatch: pytest.MonkeyPatch) -> None:
    redis = services()["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert '--requirepass "$$REDIS_PASSWORD"' in command
    assert any(v.endswith(":/data") for v in redis["volumes"]), "AOF directory must be a volume"
    env = read_env_file(ENV_EXAMPLE)
    password = env["REDIS_PASSWORD"]
    assert password
    # Every e2vpt service reaches the compose Redis with that password.
    for name in ("registry", *INFERENCE_SERVICES):
        url = settings_for(service_env(name), monkeypatch).redis_url
        assert url == f"redis://:{password}@redis:6379/0", name


def test_depends_on_waits_for_healthy_services() -> None:
    svcs = services()
    for name, svc in svcs.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in svcs, f"{name} depends on unknown service {dep}"
            assert cond["condition"] == "service_healthy"
            assert "healthcheck" in svcs[dep]


def test_ports_are_loopback_except_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, svc in services().items():
        for ip, host_port, container_port in port_mappings(svc):
            if name in INFERENCE_SERVICES:
                inference = settings_for(service_env(name), monkeypatch).ts_inference_port
                if container_port == inference:
                    assert ip is None, "the inference port is the one public port"
                    continue
            assert ip == "127.0.0.1", f"{name} publishes {host_port} beyond loopback"


def test_torchserve_ports_agree_with_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in INFERENCE_SERVICES:
        s = settings_for(service_env(name), monkeypatch)
        published = {c for _, _, c in port_mappings(services()[name])}
        assert s.metrics_port is not None, "the worker metrics endpoint must be on for Prometheus"
        assert published == {s.ts_inference_port, s.ts_management_port, s.ts_metrics_port, s.metrics_port}
        # Inside a container the services must listen beyond loopback, or nothing can reach them.
        assert s.ts_bind == "0.0.0.0" and s.metrics_bind == "0.0.0.0"


def test_gpu_reserved_in_gpu_profile_only(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu, cpu = services()["torchserve-gpu"], services()["torchserve-cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    assert "deploy" not in cpu
    assert settings_for(service_env("torchserve-gpu"), monkeypatch).device.startswith("cuda")
    assert settings_for(service_env("torchserve-cpu"), monkeypatch).device == "cpu" or "E2VPT_DEVICE" not in (
        service_env("torchserve-cpu")
    )
    assert gpu["build"]["target"] == "gpu" and cpu["build"]["target"] == "cpu"


def test_env_variables_are_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    known = env_names()

    def owners(key: str) -> set[str]:
        return {s for prefix, svcs in FOREIGN_ENV.items() if key.startswith(prefix) for s in svcs}

    # The shared env file: e2vpt settings, or variables one of the services is known to use.
    for key in read_env_file(ENV_EXAMPLE):
        assert key in known or owners(key), f"{key} in {ENV_EXAMPLE.name} is neither a setting nor known"
    for name, svc in services().items():
        environment = svc.get("environment") or {}
        for key in environment:
            if key not in known:
                assert name in owners(key), f"{name} sets {key}: not an e2vpt setting ({sorted(known)})"
        env = service_env(name)
        if any(k in known for k in env):
            settings_for(env, monkeypatch)  # the values validate (types, ports)
    example_keys = set(read_env_file(ENV_EXAMPLE))
    assert "E2VPT_REGISTRY_TOKEN" in example_keys and "REDIS_PASSWORD" in example_keys


def test_env_files_have_examples_and_are_ignored() -> None:
    ignored = (ROOT / ".gitignore").read_text().split()
    for svc in services().values():
        for env_file in svc.get("env_file", []):
            assert (ROOT / f"{env_file}.example").is_file(), env_file
            assert env_file in ignored, f"{env_file} holds secrets: it must be git-ignored"


def test_bind_mounts_exist() -> None:
    ignored = (ROOT / ".gitignore").read_text().split()
    for name, svc in services().items():
        for volume in svc.get("volumes", []):
            source = str(volume).split(":")[0]
            if not source.startswith("."):
                assert source in compose()["volumes"], f"{name}: named volume {source} is not declared"
                continue
            path = ROOT / source
            if source.rstrip("/").lstrip("./") in {i.strip("/") for i in ignored}:
                continue  # an output directory (runs/): created by training or by Docker on first start
            assert path.exists(), f"{name} mounts {source}, which does not exist"


# ----------------------------------------------------------------------------------------- Dockerfiles
def test_build_contexts_dockerfiles_and_targets_exist() -> None:
    for name, svc in services().items():
        if "build" not in svc:
            continue
        dockerfile = dockerfile_for(svc)
        assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
        stages = {m.group(1) for m in re.finditer(r"^FROM \S+ AS (\S+)", dockerfile.read_text(), re.M | re.I)}
        if "target" in svc["build"]:
            assert svc["build"]["target"] in stages, f"{name}: no stage {svc['build']['target']}"


def test_dockerfile_copy_sources_exist() -> None:
    for path in DEPLOY.glob("Dockerfile.*"):
        for word, args in dockerfile_instructions(path):
            if word == "COPY" and not args.startswith("--from"):
                for source in shlex.split(args)[:-1]:
                    assert (ROOT / source).exists(), f"{path.name} copies missing {source}"


def test_dockerfile_pins_agree_with_pyproject() -> None:
    pins = dict(re.findall(r'^\s*"([A-Za-z0-9_.-]+)==([^"]+)",', (ROOT / "pyproject.toml").read_text(), re.M))
    assert {"torch", "onnxruntime"} <= set(pins)
    serve = (DEPLOY / "Dockerfile.serve").read_text()
    assert f"onnxruntime-gpu=={pins['onnxruntime']}" in serve, (
        "onnxruntime-gpu must match the onnxruntime pin"
    )
    for version in re.findall(r"torch==([\w.+]+)", serve):
        assert version == pins["torch"]
    assert "openjdk-17" in serve, "TorchServe's frontend needs Java 17"


def test_entrypoints_are_the_repos_scripts_and_valid_commands() -> None:
    serve = dict(dockerfile_instructions(DEPLOY / "Dockerfile.serve"))
    entry = json.loads(serve["ENTRYPOINT"])
    script = ROOT / entry[0]
    assert entry == ["deploy/serve-entrypoint.sh"] and script.is_file()
    assert os.access(script, os.X_OK), "the entrypoint script must be executable"
    commands = cli_commands(script.read_text())
    names = [" ".join(c[:2]) for c in commands]
    assert sorted(set(names)) == ["serve build-mar", "serve start", "serve stop"]
    assert names.index("serve build-mar") < names.index("serve start")
    for argv in commands:
        assert_cli_parses(argv)

    registry = dict(dockerfile_instructions(DEPLOY / "Dockerfile.registry"))
    entry = json.loads(registry["ENTRYPOINT"])
    assert entry[:3] == ["python", "-m", "e2vpt.cli"]
    assert_cli_parses(entry[3:] + json.loads(registry["CMD"]))
    assert_cli_parses(entry[3:] + services()["registry"]["command"])


def test_healthchecks_use_the_repos_script() -> None:
    script = DEPLOY / "healthcheck.py"
    for name in ("registry", *INFERENCE_SERVICES):
        test = services()[name]["healthcheck"]["test"]
        assert test[1:3] == ["python", "deploy/healthcheck.py"] and script.is_file()
        assert test[3] == ("registry" if name == "registry" else "torchserve")
    out = subprocess.run(
        [sys.executable, str(script), "registry", "--host", "127.0.0.1", "--timeout", "0.5"],
        capture_output=True,
        text=True,
        env={**os.environ, "E2VPT_REGISTRY_PORT": "1"},
    )
    assert out.returncode == 1 and out.stdout.startswith("unhealthy"), "nothing listens on port 1"


def test_registry_port_agrees_with_its_command() -> None:
    registry = services()["registry"]
    argv = build_parser().parse_args(["registry", "serve", *registry["command"]])
    published = {c for _, _, c in port_mappings(registry)}
    assert published == {argv.port}
    assert argv.host == "0.0.0.0"


# ---------------------------------------------------------------------------------- Prometheus / Grafana
def prometheus_targets() -> dict[str, list[str]]:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    return {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }


def test_prometheus_targets_match_services_and_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    svcs = services()
    hosts: dict[str, set[str]] = {}
    for name, svc in svcs.items():
        hosts.setdefault(name, set()).add(name)
        for net in (svc.get("networks") or {}).values():
            for alias in (net or {}).get("aliases", []):
                hosts.setdefault(alias, set()).add(name)
    targets = prometheus_targets()
    assert {"torchserve", "e2vpt-workers", "registry"} <= set(targets)
    for job, job_targets in targets.items():
        for target in job_targets:
            host, port = target.rsplit(":", 1)
            assert host in hosts, f"{job}: {host} is not a compose service or alias"
            for service in hosts[host]:
                assert int(port) in {c for _, _, c in port_mappings(svcs[service])}, f"{job}: {target}"
    for name in INFERENCE_SERVICES:
        s = settings_for(service_env(name), monkeypatch)
        assert targets["torchserve"] == [f"torchserve:{s.ts_metrics_port}"]
        assert targets["e2vpt-workers"] == [f"torchserve:{s.metrics_port}"]
    registry_port = build_parser().parse_args(["registry", "serve", *svcs["registry"]["command"]]).port
    assert targets["registry"] == [f"registry:{registry_port}"]


def test_grafana_provisioning_is_mounted_and_consistent() -> None:
    grafana = services()["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"] if v.startswith(".")}
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/e2vpt.yml").read_text())[
        "providers"
    ]
    assert mounts[providers[0]["options"]["path"]] == "./deploy/grafana/dashboards"
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    ds = datasource["datasources"][0]
    port = int(ds["url"].rsplit(":", 1)[1])
    assert ds["url"].startswith("http://prometheus:") and port == 9090
    dashboard = json.loads((DEPLOY / "grafana/dashboards/e2vpt.json").read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == ds["uid"]


def test_dashboard_queries_use_only_real_metric_names() -> None:
    exported = exported_metric_names([ServingMetrics().registry, RegistryMetrics().registry]) | {"up"}
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    used: set[str] = set()
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{expr!r} uses {unknown}, not exported by e2vpt.serving.metrics / registry_api"
        used |= names
    # The dashboard covers what the issue asks for: latency, throughput/errors, cache, batch composition.
    for needed in ("e2vpt_request_latency_seconds_bucket", "e2vpt_requests_total", "e2vpt_cache_hits_total",
                   "e2vpt_batch_size_bucket", "e2vpt_tasks_per_batch_bucket", "e2vpt_registry_changes_total"):  # fmt: skip
        assert needed in used, needed


def test_promql_name_extraction_catches_a_wrong_name() -> None:
    expr = 'histogram_quantile(0.99, sum by (task, le) (rate(e2vpt_latency_typo_bucket{task=~"$task"}[5m])))'
    assert promql_metric_names(expr) == {"e2vpt_latency_typo_bucket"}


# ---------------------------------------------------------------------------------- docker compose config
def test_docker_compose_config_when_a_client_can() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` client here")
    env = {**os.environ, "COMPOSE_PROFILES": "cpu,gpu"}
    env_file = DEPLOY / ".env"
    created = not env_file.exists()
    if created:
        shutil.copy(ENV_EXAMPLE, env_file)
    try:
        out = subprocess.run(
            [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
            capture_output=True,
            text=True,
            env=env,
        )
    finally:
        if created:
            env_file.unlink()
    assert out.returncode == 0, out.stderr


# -------------------------------------------------------------------------------------- README / bench
def test_readme_config_table_is_generated_from_settings() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_config.py"), "--check"], capture_output=True
    )
    assert out.returncode == 0, out.stderr.decode()
    readme = (ROOT / "README.md").read_text()
    for env in env_names():
        assert f"`{env}`" in readme, env


def test_readme_keeps_its_first_lines() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[:5] == [
        "# E2VPT Serve",
        "",
        "```bash",
        "make demo   # set up, train three tasks, register them, serve them from one TorchServe, query it",
        "make test   # set up and run the test suite (real Redis, real TorchServe, tiny backbones)",
    ]


def test_summarize_copies_numbers_and_reports_missing_and_broken(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import summarize
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    results = tmp_path / "results"
    results.mkdir()
    (results / "model_cpu.json").write_text(
        json.dumps(
            {"device": "cpu", "rows": [{"batch": 8, "ms_p50": 12.3456789}, {"batch": 16, "ms_p50": 20.5}]}
        )
    )
    (results / "onnx_cpu.json").write_text("{not json")
    assert summarize.main(["--results", str(results)]) == 0
    text = (results / "SUMMARY.md").read_text()
    assert "| 8 | 12.35 |" in text and "| 16 | 20.5 |" in text and "| device | cpu |" in text
    assert "onnx_cpu" in text and "unreadable" in text
    missing = text.split("## Missing", 1)[1]
    assert "bench_registry" in missing and "bench_serving" in missing and "bench_model" not in missing
    # Nothing but what the files hold: every number in the tables comes from the input.
    numbers = set(
        re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", text.split("## model_cpu", 1)[1].split("\n## ", 1)[0])
    )
    assert numbers <= {"8", "16", "12.35", "20.5"}, numbers
    empty = tmp_path / "none"
    assert summarize.main(["--results", str(empty)]) == 0
    assert "No result files found" in (empty / "SUMMARY.md").read_text()


def test_make_bench_runs_the_runner() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert "benchmarks/run_all.py" in recipe and (ROOT / "benchmarks" / "run_all.py").is_file()


def readme_cli_commands() -> list[list[str]]:
    """`python -m e2vpt.cli ...` lines of the README's bash blocks (continuations joined, env prefix dropped)."""
    readme = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            commands += cli_commands(line)
    return commands


def test_readme_commands_are_real() -> None:
    commands = readme_cli_commands()
    assert {c[0] for c in commands} >= {"train", "tasks", "registry", "serve"}
    for argv in commands:
        assert_cli_parses(argv)
    # The container entrypoint runs what the README tells users to run.
    entry = cli_commands((DEPLOY / "serve-entrypoint.sh").read_text())
    assert all(c[:2] in [r[:2] for r in commands] for c in entry)


# ------------------------------------------------------------- the container entrypoint, run for real
def listen_addresses(port: int) -> set[str]:
    """The (hex) local addresses with a socket listening on `port`, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, hex_port = fields[1].split(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.add(addr)
    return found


def listening_on_all_interfaces(port: int) -> bool:
    """Whether a socket listens on 0.0.0.0:port / [::]:port (what a container's published port needs)."""
    return bool(listen_addresses(port) & {"00000000", "0" * 32})


@pytest.mark.integration
def test_serve_entrypoint_runs_torchserve_until_sigterm(
    tmp_path: Path, redis_url: str, namespace: str
) -> None:
    """deploy/serve-entrypoint.sh (the container's entrypoint) builds the .mar, starts a real TorchServe
    that the container health check reports healthy, exposes every port the compose file publishes on
    all interfaces, and stops TorchServe on SIGTERM."""
    import signal
    import time

    import httpx

    from e2vpt.core.backbone import save_checkpoint
    from e2vpt.dev.localredis import free_ports

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_backbone

    bb = tiny_backbone()
    ckpt = save_checkpoint(bb.model, bb.info.name, bb.info.model_kwargs, tmp_path / "backbone.safetensors")
    ports = dict(zip(("inference", "management", "metrics", "worker"), free_ports(4), strict=True))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("E2VPT_")},
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "OMP_NUM_THREADS": "1",
        "E2VPT_REDIS_URL": redis_url,
        "E2VPT_STORE_NAMESPACE": namespace,
        "E2VPT_BACKBONE_CHECKPOINT": str(ckpt),
        "E2VPT_TS_WORKDIR": str(tmp_path / "ts"),
        "E2VPT_TS_MAR_DIR": str(tmp_path / "mar"),
        "E2VPT_TS_BIND": "0.0.0.0",
        "E2VPT_METRICS_BIND": "0.0.0.0",
        "E2VPT_TS_INFERENCE_PORT": str(ports["inference"]),
        "E2VPT_TS_MANAGEMENT_PORT": str(ports["management"]),
        "E2VPT_TS_METRICS_PORT": str(ports["metrics"]),
        "E2VPT_METRICS_PORT": str(ports["worker"]),
        "E2VPT_TS_WORKERS": "1",
    }
    log = open(tmp_path / "entrypoint.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(DEPLOY / "serve-entrypoint.sh")],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            health = subprocess.run(
                [sys.executable, str(DEPLOY / "healthcheck.py"), "torchserve"],
                env=env,
                capture_output=True,
                text=True,
            )
            if health.returncode == 0:
                break
            time.sleep(2)
        output = (tmp_path / "entrypoint.log").read_text(errors="replace")
        assert proc.poll() is None, f"the entrypoint exited early:\n{output[-4000:]}"
        assert health is not None and health.returncode == 0, f"{health and health.stdout}\n{output[-4000:]}"
        # Every port the compose file publishes listens beyond loopback inside the container.
        for name, port in ports.items():
            deadline = time.monotonic() + 30
            while not listening_on_all_interfaces(port) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert listening_on_all_interfaces(port), (
                f"{name} port {port} listens on {listen_addresses(port)}"
            )
        worker = httpx.get(f"http://127.0.0.1:{ports['worker']}/metrics", timeout=10).text
        assert "e2vpt_cache_resident_tasks" in worker
        frontend = httpx.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10)
        assert frontend.status_code == 200
        ts_pid = json.loads((tmp_path / "ts" / "state.json").read_text())["pid"]
        # A token-less ping is refused: the health check had to use TorchServe's key.
        assert httpx.get(f"http://127.0.0.1:{ports['inference']}/ping", timeout=10).status_code in (
            400,
            401,
            403,
        )

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(ts_pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("TorchServe still runs after the entrypoint's SIGTERM")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        state = tmp_path / "ts" / "state.json"
        if state.is_file():
            pid = json.loads(state.read_text()).get("pid")
            if pid:
                from e2vpt.torchserve.archive import stop_group

                stop_group(int(pid), timeout=10)
        log.close()


def test_gen_config_attributes_comments_to_the_right_field(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_config", ROOT / "docs" / "gen_config.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    source = tmp_path / "fake_settings.py"
    source.write_text(
        "from pydantic_settings import BaseSettings, SettingsConfigDict\n\n\n"
        "class FakeSettings(BaseSettings):\n"
        "    model_config = SettingsConfigDict(env_prefix='E2VPT_')\n\n"
        "    # --- first section ---\n"
        "    alpha: int = 1  # inline about alpha\n"
        "    beta: str = 'b'\n"
        "    # above gamma\n"
        "    gamma: float = 0.5\n"
    )
    spec = importlib.util.spec_from_file_location("fake_settings", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fake_settings"] = module
    spec.loader.exec_module(module)
    rows = {r["field"]: r for r in gen.field_docs(module.FakeSettings)}
    assert rows["alpha"]["description"] == "inline about alpha"
    assert rows["beta"]["description"] == ""
    assert rows["gamma"]["description"] == "above gamma"
    assert rows["gamma"]["env"] == "`E2VPT_GAMMA`" and rows["alpha"]["section"] == "first section"
