"""Every Redis key and channel name of a cluster, in one place (nothing is assembled
elsewhere). All start with ``lu:``. Ids inside braces are hash tags, so that what one
task or one session owns stays in one Redis Cluster slot.

=====================  =======  ===========================================================
key                    type     what
=====================  =======  ===========================================================
``lu:shapes``          set      latent shapes that have a queue (``HxW``, or ``any``)
``lu:q:{shape}``       stream   the queue of one shape; consumer group ``workers``
``lu:task:{uuid}``     hash     a task's record: owner key hash, session, status, progress,
                                result or error, its context, deliveries (``runs``), entry
``lu:sess:{sid}``      hash     a session: owner key hash, owning gateway, last frame handed out
``lu:out:{sid}``       stream   a session's frames in order (the outbox; resumes replay it)
``lu:deliver:{id}``    list     notices of frames for gateway ``id`` to send (it blocks on it)
``lu:hooks``           stream   webhooks to post; consumer group ``gateways``
``lu:img:{uuid}``      hash     an image: media type and bytes, with its TTL
``lu:img-expiry``      zset     images in S3 (``--image-store s3://…``): UUID scored by expiry
``lu:alive:{role}:id`` string   liveness of a gateway or worker (TTL)
``lu:idle``            zset     idle workers (scored by when): ENQUEUE pushes work to them
``lu:inbox:{id}``      stream   work pushed to worker ``id`` (begun already), read by it
=====================  =======  ===========================================================

Channels (pub/sub, hints only: every reader also sweeps on a timer):
``lu:gw:{id}`` tells gateway ``id`` that a task it submitted is done (``d UUID``), unless
the task's frame went to that gateway's delivery list, whose notice tells it;
``lu:work`` tells workers there is work.
"""

from __future__ import annotations

import hashlib

PREFIX = "lu:"
SHAPES = PREFIX + "shapes"
HOOKS = PREFIX + "hooks"
WORK_CHANNEL = PREFIX + "work"
WORKERS_GROUP = "workers"
GATEWAYS_GROUP = "gateways"
IMAGE_EXPIRY = PREFIX + "img-expiry"
IDLE = PREFIX + "idle"
ANY_SHAPE = "any"  # inputs whose size the gateway could not read: the engine says why


def queue(shape: str) -> str:
    return f"{PREFIX}q:{{{shape}}}"


def task(task_uuid: str) -> str:
    return f"{PREFIX}task:{{{task_uuid}}}"


def session(session_id: str) -> str:
    return f"{PREFIX}sess:{{{session_id}}}"


def outbox(session_id: str) -> str:
    return f"{PREFIX}out:{{{session_id}}}"


def deliver(gateway_id: str) -> str:
    return f"{PREFIX}deliver:{{{gateway_id}}}"


def image(image_uuid: str) -> str:
    return f"{PREFIX}img:{{{image_uuid}}}"


def inbox(worker_id: str) -> str:
    return f"{PREFIX}inbox:{{{worker_id}}}"


def alive(role: str, member_id: str) -> str:
    return f"{PREFIX}alive:{role}:{member_id}"


def gateway_channel(gateway_id: str) -> str:
    return f"{PREFIX}gw:{gateway_id}"


def key_hash(api_key: str) -> str:
    """What Redis keeps of an API key: enough to tell keys apart, never the key."""
    return hashlib.sha256(b"latent-upscaler:" + api_key.encode()).hexdigest()[:32]
