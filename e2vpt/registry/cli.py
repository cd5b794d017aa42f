"""`e2vpt tasks ...` (a client of the registry HTTP API) and `e2vpt registry serve` (runs that API).

    e2vpt tasks register FILE...            upload prompt-set files (each under its own task id)
    e2vpt tasks list [--json]               every task, one line each (fetched page by page)
    e2vpt tasks show TASK [--version N]     one task's summary, one field a line
    e2vpt tasks versions TASK               kept versions, one line each
    e2vpt tasks rollback TASK VERSION       make VERSION's content current again (as a new version)
    e2vpt tasks delete TASK                 delete a task and all its versions
    e2vpt tasks export DIR [TASK...]        backup: one prompt-set file per task (current version)
    e2vpt tasks import DIR [--skip-existing]  restore: register every *.safetensors in DIR

Changes can be made conditional (the registry checks it atomically, HTTP If-Match / If-None-Match):
`register`, `rollback` and `delete` take `--if-version N` (only if the task's current version is still
N), `register` takes `--if-absent` (only if the task is not registered yet) and `import --skip-existing`
registers only the tasks that are not; a condition that does not hold changes nothing and exits 1.

URL and token come from --url/--token/--token-file, else E2VPT_REGISTRY_URL and
E2VPT_REGISTRY_TOKEN_FILE / E2VPT_REGISTRY_TOKEN. Messages go to stderr, results to stdout: compact
aligned tables by default, the registry's full JSON with `--json` (list, show, versions).
Exit codes: 0 ok, 1 refused by the registry (4xx), 2 usage, 66 input file missing, 69 registry or
Redis unavailable, 77 not authorised.

`e2vpt registry serve` refuses to start without a configured backbone (E2VPT_BACKBONE_CHECKPOINT or
E2VPT_BACKBONE; `--default-backbone` accepts the randomly initialised default) and names a missing
checkpoint in one line (66), as `e2vpt serve build-mar` does (`backbone_problem`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from e2vpt.config import Settings, get_settings
from e2vpt.errors import CorruptPromptSet, E2VPTError, RegistryRequestError, RegistryUnreachable
from e2vpt.registry.client import RegistryClient
from e2vpt.registry.conditions import NO_CONDITION, Precondition

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NOINPUT, EXIT_UNAVAILABLE, EXIT_NOPERM = 0, 1, 2, 66, 69, 77
FILE_SUFFIX = ".safetensors"


def exit_code(exc: BaseException) -> int:
    if isinstance(exc, RegistryUnreachable):
        return EXIT_UNAVAILABLE
    if isinstance(exc, E2VPTError):
        status = exc.http_status
        if status in (401, 403):
            return EXIT_NOPERM
        if status in (502, 503, 504):
            return EXIT_UNAVAILABLE
        return EXIT_REFUSED
    if isinstance(exc, FileNotFoundError):
        return EXIT_NOINPUT
    return EXIT_REFUSED


def backbone_problem(
    settings: Settings,
    *,
    checkpoint: str | None = None,
    backbone: str | None = None,
    accept_default: bool = False,
    flags: str = "",
) -> tuple[int, str] | None:
    """Why a server command cannot name its backbone, as (exit code, one-line error), or None when it can.

    Servers of one deployment (registry, TorchServe) must name the same backbone: a silently chosen default
    (a randomly initialised timm model) matches no task registered elsewhere, so it needs `accept_default`.
    `checkpoint` / `backbone`: command-line values, which win over the settings; `flags` names them."""
    ckpt = checkpoint or (None if backbone else settings.backbone_checkpoint)
    named = bool(backbone) or bool({"backbone", "backbone_pretrained"} & settings.model_fields_set)
    if ckpt is None and not named and not accept_default:
        return EXIT_USAGE, (
            "error: no backbone configured: set E2VPT_BACKBONE_CHECKPOINT (a checkpoint file) or "
            f"E2VPT_BACKBONE (a timm name){flags}; --default-backbone uses a randomly initialised "
            f"{settings.backbone}, which matches no task registered against another backbone"
        )
    if ckpt is not None and not Path(ckpt).expanduser().is_file():
        where = "--checkpoint" if checkpoint else "E2VPT_BACKBONE_CHECKPOINT"
        return (
            EXIT_NOINPUT,
            f"error: backbone checkpoint not found: {ckpt} ({where}, relative to {Path.cwd()})",
        )
    return None


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _register_file(client: RegistryClient, path: Path, when: Precondition) -> dict[str, Any]:
    """Upload one file under its own task id (read locally only to learn it; the server validates)."""
    from e2vpt.core.promptfile import read_file, read_metadata  # no torch

    data = read_file(path, get_settings().max_prompt_set_bytes)
    task_id = read_metadata(data).get("task_id")
    if not isinstance(task_id, str) or not task_id:
        raise CorruptPromptSet(f"{path}: the prompt set's metadata names no task id")
    return client.register(data, task_id, when=when)


def _register_files(
    client: RegistryClient,
    paths: list[Path],
    when: Precondition = NO_CONDITION,
    *,
    skip_existing: bool = False,
) -> int:
    """Register each file; `skip_existing`: a task that is already registered is skipped, not an error."""
    worst = EXIT_OK
    for path in paths:
        try:
            result = _register_file(client, path, when)
        except (E2VPTError, OSError) as exc:
            if skip_existing and isinstance(exc, RegistryRequestError) and exc.http_status == 412:
                _err(f"{path}: skipped: {exc.message}")
                continue
            _err(f"{path}: refused: {getattr(exc, 'message', exc)}")
            if isinstance(exc, RegistryUnreachable):
                return EXIT_UNAVAILABLE
            worst = worst or exit_code(exc)
            continue
        print(f"{result['task_id']}\tversion {result['version']}\t{path}")
        if result.get("created") is False:
            _err(f"{path}: unchanged: the current version {result['version']} has the same content")
    return worst


def _when(args: argparse.Namespace) -> Precondition:
    """The condition that --if-version / --if-absent state (none without them)."""
    if getattr(args, "if_absent", False):
        return Precondition.absent()
    return NO_CONDITION if args.if_version is None else Precondition.version(args.if_version)


def cmd_register(client: RegistryClient, args: argparse.Namespace) -> int:
    if args.if_version is not None and len(args.files) > 1:
        _err("error: --if-version names one task's version: register one file with it")
        return EXIT_USAGE
    return _register_files(client, [Path(p) for p in args.files], _when(args))


# Columns of the compact tables: (heading, summary field); missing fields print as "-".
LIST_COLUMNS = (
    ("TASK", "task_id"), ("VERSION", "version"), ("METHOD", "method"), ("CLASSES", "num_classes"),
    ("P", "num_prompts"), ("T", "num_kv"), ("PARAMS", "num_parameters"), ("DTYPE", "dtype"),
    ("BYTES", "size"), ("REGISTERED", "registered_at"),
)  # fmt: skip
VERSION_COLUMNS = (
    ("VERSION", "version"), ("CURRENT", "current"), ("ACTION", "action"), ("FROM", "rolled_back_from"),
    ("CLASSES", "num_classes"), ("P", "num_prompts"), ("T", "num_kv"), ("PARAMS", "num_parameters"), ("BYTES", "size"),
    ("SHA256", "sha256"), ("REGISTERED", "registered_at"),
)  # fmt: skip
SHOW_FIELDS = (
    "task_id", "version", "action", "rolled_back_from", "method", "fingerprint", "num_classes", "num_prompts", "num_kv",
    "share_kv", "num_parameters", "dtype", "size", "sha256", "registered_at",
)  # fmt: skip


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256: its prefix identifies it
    if isinstance(value, str) and "T" in value and value[:4].isdigit():
        return value[:19].replace("T", " ")  # an ISO time, to the second
    return str(value) if not isinstance(value, (dict, list)) else json.dumps(value, sort_keys=True)


def format_table(rows: list[dict[str, Any]], columns: tuple[tuple[str, str], ...]) -> str:
    """Rows as a table with aligned columns (two spaces apart), headings first."""
    cells = [[h for h, _ in columns]] + [[_cell(r.get(field)) for _, field in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def format_summary(summary: dict[str, Any]) -> str:
    """One task version's summary, one field a line; scalar metrics (accuracies) included, nothing nested."""
    fields = [(k, summary.get(k)) for k in SHOW_FIELDS if k in summary]
    config = summary.get("config") or {}
    if isinstance(config, dict):
        fields += [(f"config.{k}", v) for k, v in sorted(config.items()) if not isinstance(v, (dict, list))]
    metrics = summary.get("metrics") or {}
    if isinstance(metrics, dict):
        fields += [(f"metrics.{k}", v) for k, v in sorted(metrics.items()) if not isinstance(v, (dict, list))]
    width = max((len(k) for k, _ in fields), default=0)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in fields)


def cmd_list(client: RegistryClient, args: argparse.Namespace) -> int:
    tasks = list(client.iter_tasks(args.page_size))
    if args.json:
        _print_json(tasks)
        return EXIT_OK
    if tasks:
        print(format_table(tasks, LIST_COLUMNS))
    _err(f"{len(tasks)} task(s)")
    return EXIT_OK


def cmd_show(client: RegistryClient, args: argparse.Namespace) -> int:
    summary = client.show(args.task, args.version)
    if args.json:
        _print_json(summary)
    else:
        print(format_summary(summary))
    return EXIT_OK


def cmd_versions(client: RegistryClient, args: argparse.Namespace) -> int:
    versions = client.versions(args.task)
    if args.json:
        _print_json(versions)
    else:
        print(format_table(versions, VERSION_COLUMNS))
    return EXIT_OK


def cmd_rollback(client: RegistryClient, args: argparse.Namespace) -> int:
    result = client.rollback(args.task, args.version, when=_when(args))
    print(
        f"{result['task_id']}\tversion {result['version']}\t(content of version {result['rolled_back_from']})"
    )
    return EXIT_OK


def cmd_delete(client: RegistryClient, args: argparse.Namespace) -> int:
    client.delete(args.task, when=_when(args))
    _err(f"deleted {args.task}")
    return EXIT_OK


def cmd_export(client: RegistryClient, args: argparse.Namespace) -> int:
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    task_ids = args.tasks or [t["task_id"] for t in client.iter_tasks()]
    for task_id in task_ids:
        data, version = client.file(task_id)
        path = out / f"{task_id}{FILE_SUFFIX}"
        tmp = out / f".{task_id}{FILE_SUFFIX}.tmp"
        tmp.write_bytes(data)
        tmp.replace(path)
        print(f"{task_id}\tversion {version}\t{path}")
    _err(f"exported {len(task_ids)} task(s) to {out}")
    return EXIT_OK


def cmd_import(client: RegistryClient, args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    paths = sorted(folder.glob(f"*{FILE_SUFFIX}"))
    if not paths:
        _err(f"no *{FILE_SUFFIX} files in {folder}")
        return EXIT_NOINPUT
    when = Precondition.absent() if args.skip_existing else NO_CONDITION
    return _register_files(client, paths, when, skip_existing=args.skip_existing)


def _run_tasks(args: argparse.Namespace) -> int:
    settings = get_settings()
    token = args.token
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            _err(f"error: cannot read token file: {exc}")
            return EXIT_NOINPUT
    client = RegistryClient.from_settings(settings, url=args.url, token=token)
    try:
        return int(args.tasks_func(client, args))
    except E2VPTError as exc:
        where = f" (HTTP {exc.http_status} {exc.code})" if isinstance(exc, RegistryRequestError) else ""
        _err(f"error: {exc.message}{where}")
        return exit_code(exc)
    except FileNotFoundError as exc:
        _err(f"error: {exc}")
        return EXIT_NOINPUT
    finally:
        client.close()


def _run_serve(args: argparse.Namespace) -> int:
    settings = get_settings()
    problem = backbone_problem(settings, accept_default=args.default_backbone)
    if problem is not None:
        _err(problem[1])
        return problem[0]
    import uvicorn

    from e2vpt.registry.api import create_app

    try:
        app = create_app(settings)
    except E2VPTError as exc:  # Redis unreachable, an unsupported backbone: one line, not a traceback
        _err(f"error: the registry cannot start: {exc.message}")
        return exit_code(exc)
    except (OSError, ValueError) as exc:
        _err(f"error: the registry cannot start: {exc}")
        return EXIT_NOINPUT if isinstance(exc, FileNotFoundError) else EXIT_REFUSED
    _err(f"registry: prompt sets of backbone {app.state.store.info.fingerprint}, Redis {settings.redis_url}")
    uvicorn.run(app, host=args.host or settings.registry_host, port=args.port or settings.registry_port,
                log_level=args.log_level)  # fmt: skip
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="registry API URL (default: E2VPT_REGISTRY_URL)")
    common.add_argument("--token", help="bearer token (default: E2VPT_REGISTRY_TOKEN[_FILE])")
    common.add_argument("--token-file", help="file holding the bearer token")

    tasks = subparsers.add_parser("tasks", help="manage registered prompt sets through the registry API")
    sub = tasks.add_subparsers(dest="tasks_command", metavar="ACTION", required=True)

    def add(name: str, func: Any, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_)
        p.set_defaults(func=_run_tasks, tasks_func=func)
        return p

    if_version = {
        "type": int,
        "metavar": "N",
        "help": "only if the task's current version is N (else exit 1)",
    }
    p = add("register", cmd_register, "register prompt-set files")
    p.add_argument("files", nargs="+", metavar="FILE")
    only = p.add_mutually_exclusive_group()
    only.add_argument("--if-version", **if_version)
    only.add_argument("--if-absent", action="store_true", help="only if the task is not registered yet")
    json_help = "the registry's full JSON instead of a table"
    p = add("list", cmd_list, "list tasks")
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("--page-size", type=int, default=100)
    p = add("show", cmd_show, "show a task's summary")
    p.add_argument("task")
    p.add_argument("--version", type=int)
    p.add_argument("--json", action="store_true", help=json_help)
    p = add("versions", cmd_versions, "list a task's kept versions")
    p.add_argument("task")
    p.add_argument("--json", action="store_true", help=json_help)
    p = add("rollback", cmd_rollback, "make an earlier version current again (as a new version)")
    p.add_argument("task")
    p.add_argument("version", type=int)
    p.add_argument("--if-version", **if_version)
    p = add("delete", cmd_delete, "delete a task and all its versions")
    p.add_argument("task")
    p.add_argument("--if-version", **if_version)
    p = add("export", cmd_export, "write every (or the named) task's current file into a folder")
    p.add_argument("dir")
    p.add_argument("tasks", nargs="*", metavar="TASK")
    p = add("import", cmd_import, "register every prompt-set file of a folder")
    p.add_argument("dir")
    p.add_argument("--skip-existing", action="store_true", help="leave tasks that are registered as they are")

    registry = subparsers.add_parser("registry", help="the registry HTTP API server")
    rsub = registry.add_subparsers(dest="registry_command", metavar="ACTION", required=True)
    serve = rsub.add_parser("serve", help="run the registry API with uvicorn")
    serve.add_argument("--host", help="bind address (default: E2VPT_REGISTRY_HOST)")
    serve.add_argument("--port", type=int, help="port (default: E2VPT_REGISTRY_PORT)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument(
        "--default-backbone",
        action="store_true",
        help="accept the default backbone when none is configured (randomly initialised)",
    )
    serve.set_defaults(func=_run_serve)
