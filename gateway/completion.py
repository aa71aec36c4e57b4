"""What a finished engine request becomes on the wire: its result item, or its error.

Shared by the two places that read engine outputs: the gateway core (``serve``, where
the engine runs in this process) and a cluster worker (``gateway.cluster.worker``).
:meth:`Completion.outcome` stores the output image, PUTs it to the task's
``uploadEndpoint`` when there is one (before the result is reported), and builds the
Runware result item; a failure raises the :class:`TaskError` the task ends with.
"""

from __future__ import annotations

import asyncio
import base64
import logging

import orjson

from engine.api import EngineError, ErrorCode, UpscaleResult

from .errors import TaskError, internal_error
from .http import Outbound, OutboundError
from .images import ImageStore, StoredImage, new_uuid
from .protocol import Upscale, data_frame

__all__ = ["Completion", "engine_error", "image_url", "shutdown_error"]

logger = logging.getLogger(__name__)

# What a success frame carries in a cluster's Redis: one whose image payload is larger is
# kept there without it (``RedisState.finish``), and the gateway sending it puts it back.
PAYLOAD_MARK = b'"_payload":'


class Completion:
    def __init__(
        self, store: ImageStore, outbound: Outbound, *, output_ttl: float, price_per_gpu_hour: float
    ) -> None:
        self.store = store
        self.outbound = outbound
        self.output_ttl = output_ttl  # default lifetime of an output (a task's ttl wins)
        self.price_per_gpu_hour = price_per_gpu_hour

    async def outcome(
        self,
        task: Upscale,
        output: UpscaleResult | EngineError,
        input_uuid: str,
        base_url: str,
        *,
        unsaved: list[StoredImage] | None = None,
    ) -> dict:
        """The success item of ``task``; raises the TaskError it ends with instead.
        ``base_url`` is where its ``imageURL`` points (the gateway that took the task).
        With ``unsaved`` (a cluster worker), the output image is not written here but
        added to that list, for the caller to write in the same step as the task's
        outcome (one round trip to Redis instead of two)."""
        if isinstance(output, EngineError):
            raise engine_error(output, task.image_field)
        media_type, ttl = output.output_format.media_type, self.ttl_of(task)
        if unsaved is None:
            stored = await self.store.put(output.image, media_type, ttl)
        else:
            stored = StoredImage(new_uuid(), output.image, media_type, self.store.clock() + ttl)
            unsaved.append(stored)
        if task.uploadEndpoint:
            await self._upload(task, output, stored)
        url = await self.url(base_url, stored) if task.outputType == "URL" else ""
        return self._item(task, output, stored, input_uuid, url)

    def ttl_of(self, task: Upscale) -> float:
        """How long ``task``'s output image is kept (seconds): its ``ttl``, or the default."""
        return task.ttl or self.output_ttl

    async def url(self, base_url: str, stored: StoredImage) -> str:
        """An image's ``imageURL``: the gateway's ``/images/…`` (``base_url``: the gateway
        that took the task), or the store's presigned URL (``--s3-presign``)."""
        return await self.store.public_url(stored) or image_url(base_url, stored)

    async def _upload(self, task: Upscale, result: UpscaleResult, stored: StoredImage) -> None:
        try:
            await self.outbound.put_bytes(task.uploadEndpoint, result.image, stored.media_type)
        except OutboundError as exc:
            raise TaskError(
                "uploadFailed",
                f"uploading the result to uploadEndpoint failed ({exc}); the image stays retrievable "
                f"as {stored.image_uuid} for its TTL",
                parameter="uploadEndpoint",
                type="string",
            ) from exc

    def _item(
        self, task: Upscale, result: UpscaleResult, stored: StoredImage, input_uuid: str, url: str
    ) -> dict:
        item = {
            "taskType": task.taskType,
            "taskUUID": task.taskUUID,
            "status": "success",
            "imageUUID": stored.image_uuid,
            "inputImageUUID": input_uuid,
            "seed": result.seed,
        }
        if task.outputType == "URL":
            item["imageURL"] = url
        elif task.outputType == "base64Data":
            item["imageBase64Data"] = base64.b64encode(result.image).decode()
        else:
            item["imageDataURI"] = data_uri(result.image, stored.media_type)
        if task.includeCost:
            item["cost"] = round(result.engine_seconds / 3600 * self.price_per_gpu_hour, 8)
        return item

    async def with_payload(self, item: dict) -> dict:
        """A success item as first sent: a base64/data URI payload that its record left
        out (``state.without_payload``) comes back from the image store."""
        kind = item.get("_payload")
        if kind is None:
            return item
        item = {k: v for k, v in item.items() if k != "_payload"}
        stored = await self.store.get(item["imageUUID"])
        if stored is not None:
            item[kind] = (
                base64.b64encode(stored.data).decode()
                if kind == "imageBase64Data"
                else data_uri(stored.data, stored.media_type)
            )
        return item

    async def whole_frame(self, frame: bytes) -> bytes:
        """A success frame as sent: with its image payload, when it was kept without.
        Raises what the image store raises when it cannot be read (the caller keeps the
        frame for later)."""
        if PAYLOAD_MARK not in frame:
            return frame
        return data_frame(*[await self.with_payload(item) for item in orjson.loads(frame)["data"]])

    async def whole_item(self, item: dict, tries: int = 3) -> dict | None:
        """:meth:`with_payload`, tried again a few times while the store cannot be read;
        None when it never could."""
        for attempt in range(tries):
            if attempt:
                await asyncio.sleep(0.5 * 2 ** (attempt - 1))
            try:
                return await self.with_payload(item)
            except Exception as exc:  # the store is away (Redis, S3)
                error = exc
        logger.warning("the image of %s could not be read back: %s", item.get("taskUUID"), error)
        return None


def image_url(base_url: str, image: StoredImage) -> str:
    return f"{base_url}/images/{image.image_uuid}.{image.extension}"


def data_uri(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def engine_error(error: EngineError, field: str) -> TaskError:
    """An engine's error as the client sees it (``field``: where the input image was)."""
    if error.code is ErrorCode.INTERNAL:
        return internal_error()
    if error.code is ErrorCode.OVERLOADED:
        return TaskError("rateLimitExceeded", error.message)
    if error.code is ErrorCode.ABORTED:
        return TaskError("taskAborted", error.message)
    if error.code in (ErrorCode.UNAVAILABLE, ErrorCode.LOST, ErrorCode.RETRIES_EXHAUSTED):
        return TaskError(str(error.code), error.message)
    code = {"invalidImage": "invalidInputImage"}.get(str(error.code), str(error.code))
    return TaskError(code, error.message, parameter=field, type="string")


def shutdown_error(task_uuid: str, task_type: str) -> TaskError:
    return TaskError(
        "taskAborted",
        "the server shut down before the task finished",
        task_type=task_type,
        task_uuid=task_uuid,
    )
