"""The Ray Serve application's pieces that need no cluster: auth, the deployment options (fixed or
autoscaled replicas, resources, router), the builder's settings and the router's reading of a request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray")

from ray.serve.request_router import PendingRequest, RequestRouter  # noqa: E402

from e2vpt.config import Settings  # noqa: E402
from e2vpt.errors import TaskNotFound, Unauthorized  # noqa: E402
from e2vpt.rayserve.app import (  # noqa: E402
    DEPLOYMENT_ONLY,
    ROUTER_CLASS,
    Answer,
    app_builder,
    check_auth,
    engine_options,
    engine_settings,
    inference_token,
)
from e2vpt.rayserve.router import TaskAffinityRouter, task_of  # noqa: E402
from e2vpt.serving.engine import RequestItem  # noqa: E402


def test_the_token_file_wins_and_blank_means_open(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("from-file\n")
    assert inference_token(Settings(inference_token="env", inference_token_file=str(secret))) == "from-file"
    assert inference_token(Settings(inference_token="  ")) is None
    check_auth(None, None)  # no token configured: open
    check_auth("s3cret", "Bearer s3cret")
    check_auth("s3cret", "bearer  s3cret ")
    for header in (None, "", "Bearer", "Bearer wrong", "Basic s3cret", "s3cret"):
        with pytest.raises(Unauthorized):
            check_auth("s3cret", header)


def test_answers_carry_the_errors_status() -> None:
    answer = Answer.of(TaskNotFound("task 'x' is not registered"), "r1", 2)
    assert (answer.status, answer.body["error"], answer.replica) == (404, "task_not_found", "r1")


def test_fixed_replicas_on_cpu_with_the_affinity_router() -> None:
    opts = engine_options(Settings(ray_min_replicas=3, ray_max_replicas=3, ray_replica_cpus=0.5))
    assert opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0}
    router = opts["request_router_config"]
    assert router.request_router_class == ROUTER_CLASS
    assert router.request_router_kwargs == {"overload": Settings().ray_overload_queue}


def test_autoscaled_gpu_replicas_and_the_default_router_when_affinity_is_off() -> None:
    settings = Settings(device="cuda:1", ray_min_replicas=1, ray_max_replicas=6, ray_affinity=False)
    opts = engine_options(settings)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 6,
        "target_ongoing_requests": settings.ray_target_ongoing_requests,
        "look_back_period_s": settings.ray_autoscale_look_back_s,
        "upscale_delay_s": settings.ray_upscale_delay_s,
        "downscale_delay_s": settings.ray_downscale_delay_s,
    }
    assert opts["ray_actor_options"]["num_gpus"] == 1
    assert opts["request_router_config"].request_router_class != ROUTER_CLASS
    assert engine_settings(settings).device == "cuda"  # the one GPU Ray gives the replica


def test_the_builder_takes_settings_names_only() -> None:
    assert {"ray_min_replicas", "ray_max_replicas"} <= DEPLOYMENT_ONLY <= set(Settings.model_fields)
    with pytest.raises(ValueError, match="unknown settings"):
        app_builder({"ray_replicas": 3})


@pytest.fixture
def event_loop_set() -> Iterator[None]:
    """Ray's PendingRequest asks for the thread's event loop: after any `asyncio.run` (the TorchServe tests
    use it) the main thread has none, so this test failed when run after them."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    asyncio.set_event_loop(None)
    loop.close()


@pytest.mark.usefixtures("event_loop_set")
def test_the_router_reads_the_task_id_of_a_predict_call() -> None:
    assert issubclass(TaskAffinityRouter, RequestRouter)
    item = RequestItem("t1", b"img")
    assert task_of(PendingRequest(args=[item], kwargs={}, metadata=None)) == "t1"  # type: ignore[arg-type]
    assert task_of(PendingRequest(args=[], kwargs={"item": item}, metadata=None)) == "t1"  # type: ignore[arg-type]
    assert task_of(PendingRequest(args=["x"], kwargs={}, metadata=None)) is None  # type: ignore[arg-type]
    assert task_of(None) is None
