"""Typed errors of the whole project, and their HTTP status (the one mapping every server uses)."""

from __future__ import annotations

from typing import Any


class E2VPTError(Exception):
    """Base of every error this project raises on purpose. `http_status` is what a server answers."""

    http_status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.message}


class InvalidPromptSet(E2VPTError):
    """A prompt set that is structurally wrong: shapes, dtype, non-finite values, metadata."""

    http_status = 422
    code = "invalid_prompt_set"


class CorruptPromptSet(InvalidPromptSet):
    """Bytes that are not a readable safetensors prompt-set file (truncated, pickled, garbage)."""

    code = "corrupt_prompt_set"


class UnsupportedFormatVersion(InvalidPromptSet):
    code = "unsupported_format_version"


class IncompatiblePromptSet(InvalidPromptSet):
    """A prompt set made for another backbone (name, fingerprint or shapes differ)."""

    code = "incompatible_prompt_set"


class TaskIdMismatch(InvalidPromptSet):
    """A file uploaded under one task id whose metadata names another (registry API)."""

    code = "task_id_mismatch"


class PromptSetTooLarge(E2VPTError):
    http_status = 413
    code = "prompt_set_too_large"


class RequestTooLarge(E2VPTError):
    """A request body (other than a prompt-set file or an image) over its size limit."""

    http_status = 413
    code = "request_too_large"


class InvalidTaskId(E2VPTError):
    http_status = 400
    code = "invalid_task_id"


class TaskNotFound(E2VPTError):
    http_status = 404
    code = "task_not_found"


class VersionNotFound(TaskNotFound):
    code = "version_not_found"


class PreconditionFailed(E2VPTError):
    """A conditional write (If-Match / If-None-Match) whose condition does not hold: nothing was written.
    `current`: the task's current version (None: not registered), so a client can re-read and retry."""

    http_status = 412
    code = "precondition_failed"

    def __init__(self, message: str, current: int | None = None) -> None:
        super().__init__(message)
        self.current = current

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "current_version": self.current}


class InvalidImage(E2VPTError):
    http_status = 400
    code = "invalid_image"


class ImageTooLarge(E2VPTError):
    http_status = 413
    code = "image_too_large"


class BadRequest(E2VPTError):
    http_status = 400
    code = "bad_request"


class Unauthorized(E2VPTError):
    http_status = 401
    code = "unauthorized"


class StoreUnavailable(E2VPTError):
    """The prompt store (Redis) cannot be reached. `retry_after`: seconds until the store is tried again,
    where known (an HTTP server's `Retry-After`)."""

    http_status = 503
    code = "store_unavailable"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RegistryRequestError(E2VPTError):
    """An error answered by the registry API to a client (CLI): carries the server's status and code."""

    def __init__(self, message: str, *, status: int, code: str = "registry_error") -> None:
        super().__init__(message)
        self.http_status = status
        self.code = code


class RegistryUnreachable(E2VPTError):
    """The registry API cannot be reached (connection refused, timeout)."""

    http_status = 503
    code = "registry_unreachable"


class UnsupportedBackbone(E2VPTError):
    """A model that is not a timm VisionTransformer this project can prompt (or export)."""

    http_status = 422
    code = "unsupported_backbone"


class InvalidDataset(E2VPTError):
    """A dataset folder or list file that cannot be used (missing class folder, unreadable image)."""

    http_status = 422
    code = "invalid_dataset"


class TrainingDiverged(E2VPTError):
    """Training stopped because the loss became non-finite or rose far above its start: the learning
    rate (or optimizer) does not suit this backbone and data. `e2vpt train` exits 1 with the message."""

    http_status = 422
    code = "training_diverged"


class RegistrationFailed(E2VPTError):
    """The prompt registry refused a prompt set or could not be reached (training's `--register`)."""

    http_status = 502
    code = "registration_failed"


class ExportError(E2VPTError):
    """A backbone or an option the ONNX export cannot express (dynamic image size, no pooled output, an
    unsupported opset or dtype), or an export whose graph fails its checks."""

    http_status = 422
    code = "export_error"


class IncompatibleOnnxModel(E2VPTError):
    """An .onnx file exported from another backbone (fingerprint) or not by this project. A deployment
    error, never caused by a request: 500."""

    http_status = 500
    code = "incompatible_onnx_model"


class BackendUnavailable(E2VPTError):
    """An inference backend (or onnxruntime execution provider) that is unknown or not installed."""

    http_status = 500
    code = "backend_unavailable"


def excerpt(value: object, limit: int = 80) -> str:
    """The repr of a client-supplied value for an error message, cut to about `limit` characters: a message
    never echoes unbounded input (a task id of 6 million emoji, a 24 MB request, would otherwise come back
    as a 72 MB answer)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def http_status(exc: BaseException) -> int:
    """HTTP status for any exception: typed errors carry theirs, everything else is a 500."""
    return exc.http_status if isinstance(exc, E2VPTError) else 500
