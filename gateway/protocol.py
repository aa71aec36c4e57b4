"""The wire protocol without I/O: frames in, typed tasks or precise errors out.

:func:`parse_frame` takes one client frame (text or bytes) and returns either a
frame-level :class:`~gateway.errors.TaskError` (not JSON, not an array of objects, too
many tasks) or one entry per task, each a validated task model or the task's own
error. One bad task never affects its neighbours. Server frames are built by
:func:`data_frame` and :func:`error_frame`, always JSON objects, never arrays.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import TaskError

__all__ = [
    "MAX_SEED",
    "Authentication",
    "GetResponse",
    "ImageUpload",
    "Ping",
    "Task",
    "TooManyTasks",
    "Upscale",
    "data_frame",
    "error_frame",
    "parse_frame",
]

MAX_SEED = 9223372036854775807


class _Model(BaseModel):
    # Strict: "5" is not an integer and 1 is not a boolean. Unknown fields are ignored.
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class Authentication(_Model):
    taskType: Literal["authentication"]
    apiKey: str | None = None
    connectionSessionUUID: str | None = None


class Ping(_Model):
    taskType: Literal["ping"]
    ping: bool | None = None


class UpscaleSettings(_Model):
    positivePrompt: Annotated[str, Field(max_length=10_000)] = ""
    negativePrompt: Annotated[str, Field(max_length=10_000)] = ""
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    steps: Annotated[int, Field(ge=1)] = 20
    CFGScale: Annotated[float, Field(ge=0, le=100)] = 1.0
    clipSkip: Annotated[int, Field(ge=0, le=4)] = 0


class UpscaleInputs(_Model):
    image: Annotated[str, Field(min_length=1)] | None = None


class Upscale(_Model):
    taskType: Literal["imageUpscale", "upscale"]
    taskUUID: str
    # Absent: the loaded model (the hosted API accepts an upscale without one).
    model: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    inputImage: Annotated[str, Field(min_length=1)] | None = None
    inputs: UpscaleInputs | None = None
    upscaleFactor: float = 2
    outputType: Literal["URL", "base64Data", "dataURI"] = "URL"
    outputFormat: str = "JPG"
    outputQuality: Annotated[int, Field(ge=20, le=99)] = 95
    deliveryMethod: Literal["sync", "async"] = "sync"
    webhookURL: Annotated[str, Field(max_length=2048)] | None = None
    uploadEndpoint: Annotated[str, Field(max_length=2048)] | None = None
    ttl: Annotated[int, Field(ge=60)] | None = None
    includeCost: bool = False
    includeProgress: bool = False
    numberResults: Annotated[int, Field(ge=1)] = 1
    settings: UpscaleSettings = UpscaleSettings()

    @field_validator("outputFormat")
    @classmethod
    def _format(cls, value: str) -> str:
        upper = value.upper()
        upper = "JPG" if upper == "JPEG" else upper
        if upper not in ("JPG", "PNG", "WEBP"):
            raise ValueError("must be one of JPG, PNG, WEBP")
        return upper

    @property
    def image_field(self) -> str:
        return "inputs.image" if self.inputs is not None and self.inputs.image is not None else "inputImage"

    @property
    def image(self) -> str:
        return self.inputs.image if self.image_field == "inputs.image" else self.inputImage  # type: ignore[union-attr]


class ImageUpload(_Model):
    taskType: Literal["imageUpload"]
    taskUUID: str
    image: Annotated[str, Field(min_length=1)]


class GetResponse(_Model):
    taskType: Literal["getResponse"]
    taskUUID: str


Task = Authentication | Ping | Upscale | ImageUpload | GetResponse
_MODELS: dict[str, type[_Model]] = {
    "authentication": Authentication,
    "ping": Ping,
    "imageUpscale": Upscale,
    "upscale": Upscale,
    "imageUpload": ImageUpload,
    "getResponse": GetResponse,
}
_NEEDS_UUID = ("imageUpscale", "upscale", "imageUpload", "getResponse")

# Codes for fields whose generic name ("invalid" + Field) would read oddly.
_CODES = {
    "settings.CFGScale": "CFGScale",
    "settings.clipSkip": "ClipSkip",
    "inputs.image": "InputImage",
    "ttl": "TTL",
}
_JSON_TYPES = {
    "int": "integer",
    "float": "number",
    "str": "string",
    "bool": "boolean",
    "literal": "string",
    "model": "object",
    "dict": "object",
}


class TooManyTasks(TaskError):
    """:func:`parse_frame`'s error for a frame over ``max_tasks`` (the REST transport
    answers it with 413, where other frame faults are 400)."""


def parse_frame(data: str | bytes, *, max_tasks: int = 256) -> TaskError | list[Task | TaskError]:
    """Parse one client frame. A frame-level problem returns one :class:`TaskError`;
    otherwise each task object yields its model or its own error, in order."""
    if isinstance(data, bytes):
        return TaskError(
            "invalidPayload",
            "binary frames are not accepted: send a text frame holding a JSON array of tasks",
        )
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        return TaskError("invalidJSON", f"the frame is not valid JSON: {exc}")
    if not isinstance(payload, list):
        return TaskError("invalidPayload", "a frame must be a JSON array of task objects, even for one task")
    if not payload:
        return TaskError("invalidPayload", "the task array is empty")
    if len(payload) > max_tasks:
        return TooManyTasks(
            "invalidPayload",
            f"the frame holds {len(payload)} tasks; at most {max_tasks} are accepted per frame",
        )
    if not any([isinstance(item, dict) for item in payload]):
        # Nothing here is a task: one frame-level error, not one per element.
        return TaskError("invalidPayload", "the task array holds no JSON objects", type="object")
    return [parse_task(item) for item in payload]


def parse_task(item: Any) -> Task | TaskError:
    """Validate one task object of a frame."""
    if not isinstance(item, dict):
        return TaskError(
            "invalidPayload", "each element of the task array must be a JSON object", type="object"
        )
    task_type = item.get("taskType")
    raw_uuid = item.get("taskUUID")
    task_uuid = raw_uuid if isinstance(raw_uuid, str) else None
    if task_type is None:
        return TaskError(
            "missingTaskType",
            "taskType is required",
            parameter="taskType",
            type="string",
            task_uuid=task_uuid,
        )
    if task_type not in _MODELS:
        return TaskError(
            "unsupportedTaskType",
            f"taskType {str(task_type)[:64]!r} is not supported; this server supports "
            "imageUpscale (or upscale), imageUpload, getResponse, authentication and ping",
            parameter="taskType",
            type="string",
            task_uuid=task_uuid,
            task_type=str(task_type)[:64],
        )
    reply_type = task_type  # replies carry the request's own taskType ("upscale" or "imageUpscale")
    if task_type in _NEEDS_UUID:
        problem = _check_uuid(raw_uuid)
        if problem is not None:
            return problem.for_task(reply_type, task_uuid)
    try:
        task = _MODELS[task_type].model_validate(item)
    except ValidationError as exc:
        return _from_validation(exc).for_task(reply_type, task_uuid)
    if isinstance(task, Upscale):
        problem = _check_upscale(task)
        if problem is not None:
            return problem.for_task(reply_type, task_uuid)
    return task


_CANONICAL_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _check_uuid(value: Any) -> TaskError | None:
    if value is None:
        return TaskError("missingTaskUUID", "taskUUID is required", parameter="taskUUID", type="string")
    try:
        if not isinstance(value, str):
            raise ValueError
        if not _CANONICAL_UUID.fullmatch(value):  # the form every SDK sends, checked cheaply
            uuid.UUID(value)  # the other spellings uuid.UUID accepts
    except ValueError:
        return TaskError(
            "invalidTaskUUID",
            "taskUUID must be a UUID string (v4 recommended)",
            parameter="taskUUID",
            type="string",
        )
    return None


def _check_upscale(task: Upscale) -> TaskError | None:
    """Rules across fields, and values this model cannot honour."""
    has_inline = task.inputImage is not None
    has_inputs = task.inputs is not None and task.inputs.image is not None
    if has_inline and has_inputs:
        return TaskError(
            "invalidInputImage",
            "give the image either as inputImage or as inputs.image, not both",
            parameter="inputImage",
            type="string",
        )
    if not has_inline and not has_inputs:
        return TaskError(
            "missingInputImage",
            "inputImage (or inputs.image) is required: an image UUID, a data URI, base64 data or an http(s) URL",
            parameter="inputImage",
            type="string",
        )
    if task.upscaleFactor != 2:
        return TaskError(
            "invalidUpscaleFactor",
            f"upscaleFactor {task.upscaleFactor:g} is not supported: this model upscales by exactly 2",
            parameter="upscaleFactor",
            type="integer",
        )
    if task.numberResults != 1:
        return TaskError(
            "unsupportedNumberResults",
            "numberResults must be 1: an upscale yields one image",
            parameter="numberResults",
            type="integer",
        )
    return None


def _from_validation(exc: ValidationError) -> TaskError:
    """The first pydantic error as a Runware error: code, dotted parameter, JSON type."""
    error = exc.errors()[0]
    parameter = ".".join(str(part) for part in error["loc"] if not isinstance(part, int)) or None
    name = _CODES.get(parameter or "", (parameter or "payload").split(".")[-1])
    name = name[0].upper() + name[1:]
    kind = error["type"]
    if kind == "missing":
        return TaskError(
            f"missing{name}", f"{parameter} is required", parameter=parameter, type=_json_type(exc, error)
        )
    detail = error["msg"]
    if "ctx" in error and "expected" in error["ctx"]:
        detail = f"must be one of {error['ctx']['expected']}"
    return TaskError(
        f"invalid{name}",
        f"{parameter}: {detail}",
        parameter=parameter,
        type=_json_type(exc, error),
    )


def _json_type(exc: ValidationError, error: dict) -> str | None:
    kind = error["type"]
    for prefix, json_type in _JSON_TYPES.items():
        if kind.startswith(prefix):
            return json_type
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return "number" if isinstance(error.get("input"), float) else "integer"
    if kind in ("string_too_short", "string_too_long", "value_error"):
        return "string"
    if kind == "missing":
        return {"model": "string", "taskUUID": "string"}.get(str(error["loc"][-1]), "string")
    return None


def data_frame(*items: dict) -> bytes:
    return orjson.dumps({"data": list(items)})


def error_frame(error: TaskError) -> bytes:
    """One error object per frame (the legacy JS SDK reads ``errors[0]`` per task)."""
    return orjson.dumps({"errors": [error.to_wire()]})
