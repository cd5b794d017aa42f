"""`e2vpt train` end to end on a tiny backbone, and `--register` against a local HTTP registry."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from e2vpt.cli import build_parser, main
from e2vpt.core.promptset import PromptSet
from e2vpt.errors import RegistrationFailed
from e2vpt.registry.client import register_prompt_set
from training.cli import DEFAULT_PRESET, train_config
from training.trainer import PRESETS, TrainConfig

TINY = [
    "--backbone",
    "vit_tiny_patch16_224",
    "--model-kwargs",
    '{"img_size": 32, "patch_size": 8, "depth": 2}',
]


class Registry:
    """A minimal HTTP endpoint speaking the registry's PUT contract, recording what it received."""

    def __init__(self, token: str = "secret") -> None:
        self.token, self.received = token, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append((self.path, dict(self.headers), body))
                if self.headers.get("Authorization") != f"Bearer {outer.token}":
                    self._send(401, {"error": "unauthorized", "detail": "bad token"})
                else:
                    self._send(201, {"task_id": self.path.rsplit("/", 1)[1], "version": len(outer.received)})

            def _send(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def registry():
    r = Registry()
    yield r
    r.close()


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c, ch in (("red", 0), ("green", 1)):
        for i in range(6):
            x = rng.integers(0, 80, (24, 24, 3), dtype=np.uint8)
            x[..., ch] = 220
            (root / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(x).save(root / c / f"{i}.png")
    return root


def test_train_cli_prunes_writes_outputs_and_registers(
    tmp_path: Path, registry: Registry, capsys, caplog
) -> None:
    out = tmp_path / "run"
    args = [
        *TINY,
        "--data",
        str(_folder(tmp_path / "ds")),
        "--method",
        "e2vpt",
        "--prompts",
        "4",
        "--kv",
        "2",
    ]
    args += [
        "--segments",
        "8",
        "--epochs",
        "2",
        "--warmup",
        "1",
        "--batch-size",
        "8",
        "--prune-tokens",
        "0.5",
    ]
    args += ["--prune-segments", "0.25", "--rewind-epochs", "1", "--no-progress", "--out", str(out)]
    args += ["--task-id", "colours", "--register", registry.url, "--token", "secret"]
    with caplog.at_level(logging.INFO):
        assert main(["train", *args]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed["num_prompts"] == 2 and printed["preset"] == "quick"
    # the plan before the start (12 images, 20% val -> 9 or 10 train images: 2 steps of 8), the ETA after epoch 1
    assert "quick: e2vpt, adamw" in caplog.text and "2 epochs x 2 steps" in caplog.text
    assert "rewind for 1 epochs" in caplog.text and "per epoch -> about" in caplog.text
    # the three accuracies and the saved set: in the JSON, report.json and the last lines
    keys = {"before_pruning", "pruned_masked", "after_rewinding", "saved_set", "saved"}
    assert set(printed["pruning"]) == keys and printed["pruning"]["saved"] == "rewound"
    last = captured.err.strip().splitlines()
    assert "before pruning" in last[-2] and "pruned (masked)" in last[-2] and "after rewind" in last[-2]
    assert last[-1].startswith("saved: the pruned set after rewind")
    ps = PromptSet.load(out / "colours.safetensors")
    assert ps.labels == ["green", "red"] and ps.num_prompts == 2 and ps.config["kept_token_indices"]
    report = json.loads((out / "report.json").read_text())
    assert report["prune"]["token_ratio"] == 0.5 and report["registered"]["version"] == 1
    assert report["prune"]["saved"] == "rewound"
    assert {**report["prune"]["val_acc"], "saved": "rewound"} == printed["pruning"]
    assert (out / "curves.png").stat().st_size > 0 and (out / "importance.png").stat().st_size > 0
    path, headers, body = registry.received[0]
    assert path == "/tasks/colours" and headers["Content-Type"] == "application/octet-stream"
    assert PromptSet.from_bytes(body).task_id == "colours"


def test_train_cli_reports_bad_data_clearly(tmp_path: Path, caplog) -> None:
    root = _folder(tmp_path / "ds")
    (root / "red" / "3.png").write_bytes(b"not a png")
    assert main(["train", *TINY, "--data", str(root), "--epochs", "1", "--out", str(tmp_path / "o")]) == 1
    assert "3.png" in caplog.text and "InvalidDataset" in caplog.text


def test_train_cli_missing_checkpoint_is_one_line_not_a_traceback(tmp_path: Path, caplog) -> None:
    root = _folder(tmp_path / "ds")
    missing = tmp_path / "nope.safetensors"
    argv = ["train", "--checkpoint", str(missing), "--data", str(root), "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    assert str(missing) in caplog.text and "Traceback" not in caplog.text


def test_register_errors_are_typed(registry: Registry, backbone) -> None:
    ps = PromptSet.create("t1", backbone.info, ["a", "b"], num_prompts=1, num_kv=1)
    assert register_prompt_set(registry.url, ps, token="secret") == {"task_id": "t1", "version": 1}
    with pytest.raises(RegistrationFailed, match=r"HTTP 401.*check --token.*bad token"):
        register_prompt_set(registry.url, ps, token="wrong")
    url = registry.url
    registry.close()
    with pytest.raises(RegistrationFailed, match="cannot reach the registry"):
        register_prompt_set(url, ps, token="secret", timeout=2)


def test_register_flag_takes_the_registry_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from e2vpt.config import Settings
    from training.cli import _registry_target

    monkeypatch.setenv("E2VPT_REGISTER_URL", "http://legacy:1")  # the former name: an alias now
    monkeypatch.setenv("E2VPT_REGISTRY_TOKEN", "tok")
    settings = Settings()
    base = ["train", "--backbone", "x", "--data", "d"]
    parse = build_parser().parse_args
    assert _registry_target(parse(base), settings) == {"register_url": None, "register_token": None}
    bare = _registry_target(parse([*base, "--register"]), settings)
    assert bare == {"register_url": "http://legacy:1", "register_token": "tok"}
    given = _registry_target(parse([*base, "--register", "http://x:2", "--token", "t2"]), settings)
    assert given == {"register_url": "http://x:2", "register_token": "t2"}


def test_presets_from_the_command_line_and_explicit_options_win() -> None:
    parse = build_parser().parse_args
    base = ["train", "--backbone", "x", "--data", "d"]
    assert DEFAULT_PRESET == "quick"
    default = train_config(parse(base))
    assert default.optimizer == "adamw" and default.epochs == PRESETS["quick"]["epochs"]
    assert train_config(parse([*base, "--preset", "paper"])) == TrainConfig()  # the official recipe
    mixed = train_config(parse([*base, "--preset", "paper", "--optimizer", "adamw", "--lr", "0.1"]))
    assert (mixed.optimizer, mixed.base_lr, mixed.epochs, mixed.batch_size) == ("adamw", 0.1, 100, 64)
    quick = train_config(parse([*base, "--epochs", "3", "--separate-kv", "--prompts", "4"]))
    assert (quick.epochs, quick.share_kv, quick.num_prompts) == (3, False, 4)
    assert quick.base_lr == PRESETS["quick"]["base_lr"]
    with pytest.raises(SystemExit):
        parse([*base, "--preset", "fast"])
    with pytest.raises(SystemExit):
        parse([*base, "--optimizer", "adam"])


def test_train_cli_divergence_exits_1_with_what_to_try(tmp_path: Path, caplog, capsys) -> None:
    """The paper's SGD at a far too large lr on a tiny backbone: stopped early, exit 1, one line naming the
    lr and suggesting --preset quick or a smaller --lr; no prompt set written."""
    out = tmp_path / "o"
    argv = ["train", *TINY, "--data", str(_folder(tmp_path / "ds")), "--preset", "paper", "--lr", "1e5"]
    argv += ["--warmup", "0", "--epochs", "5", "--batch-size", "4", "--no-progress", "--out", str(out)]
    argv += ["--task-id", "boom"]
    assert main(argv) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("TrainingDiverged:")
    assert "base_lr 100000" in errors[0] and "--preset quick" in errors[0] and "smaller --lr" in errors[0]
    assert "Traceback" not in caplog.text and not (out / "boom.safetensors").exists()
    assert capsys.readouterr().out == ""
