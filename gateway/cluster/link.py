"""One process's link to the cluster's Redis: a command client, the scripts, a pub/sub
listener and a health flag.

- The command client uses a *blocking* connection pool, sized for the process, with
  bounded connect and command timeouts: redis-py's default asyncio pool raises
  ``MaxConnectionsError`` when exhausted instead of waiting (redis-py#2517).
- :meth:`RedisLink.listen` keeps one pub/sub connection subscribed to this process's
  channels, reconnecting with backoff after Redis goes away; messages are hints only.
- :attr:`RedisLink.healthy` is what ``/readyz`` reads: a ``PING`` answered within the
  last few seconds. It is kept by a probe that also notices Redis coming back.

Redis errors reach callers as :class:`ClusterUnavailable` (from :func:`guarded`), one
type to handle wherever the cluster is used.

Scripts (:meth:`RedisLink.script`) and pipelines of scripts (queued with
:meth:`RedisLink.queue`, run with :meth:`RedisLink.execute`) go as bare ``EVALSHA`` on
connections the link holds itself (:class:`HeldConnections`), with raw replies, as do
the blocking reads on every task's path (:meth:`RedisLink.command`): not
through redis-py's ``Script(client=pipe)``, which sends ``SCRIPT EXISTS`` before every
pipeline, nor its pool and ``Pipeline.execute``, which cost as much CPU as the exchange.
Other commands, whose replies redis-py parses, use ``link.redis`` as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from . import scripts

__all__ = ["ClusterUnavailable", "RedisLink", "cancel_all", "failure", "guarded", "raise_errors"]

logger = logging.getLogger(__name__)

PROBE_EVERY = 1.0  # seconds between health probes
UNHEALTHY_AFTER = 3.0  # seconds without an answer before /readyz says 503


class ClusterUnavailable(Exception):
    """Redis could not be reached (or answered with an error) for a cluster step."""


def failure(error: BaseException) -> ClusterUnavailable:
    """A Redis failure (raised, or an answer in a pipeline) as :class:`ClusterUnavailable`."""
    return ClusterUnavailable(f"Redis: {type(error).__name__}: {error}")


def raise_errors(answers: list) -> None:
    """Raise the first error answer of a pipeline as :class:`ClusterUnavailable`."""
    for answer in answers:
        if isinstance(answer, Exception):
            raise failure(answer) from answer


async def guarded(call: Awaitable):
    """Await a Redis call; any Redis failure becomes :class:`ClusterUnavailable`."""
    try:
        return await call
    except (RedisError, OSError) as exc:
        raise failure(exc) from exc


async def cancel_all(tasks) -> None:
    """Cancel ``tasks`` and wait until every one has ended.

    A cancellation that lands while redis-py is between a command's send and its
    answer can be swallowed (the command returns normally: redis/redis-py#2028), and
    a loop that issued it then runs on forever. So what has not ended after a short
    wait is cancelled again."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.2)


class RedisLink:
    def __init__(self, url: str, *, name: str, max_connections: int = 64) -> None:
        self.url = url
        self.name = name  # shown in CLIENT LIST
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=5,  # seconds to wait for a free connection
            socket_connect_timeout=2,
            socket_timeout=5,
            health_check_interval=5,
            client_name=name,
            protocol=2,
        )
        self.redis = aioredis.Redis(connection_pool=pool)
        self.scripts = {name: self.redis.register_script(getattr(scripts, name)) for name in scripts.NAMES}
        self._held = HeldConnections(pool)
        self._answered_at = 0.0
        self._tasks: list[asyncio.Task] = []
        self._subscribers: dict[str, Callable[[bytes], None]] = {}
        self._on_reconnect: list[Callable[[], None]] = []
        self._was_down = False

    @property
    def healthy(self) -> bool:
        return time.monotonic() - self._answered_at < UNHEALTHY_AFTER

    async def start(self) -> None:
        """Wait for a first answer (bounded), then keep probing and listening."""
        try:
            async with asyncio.timeout(10):
                while not await self._ping():
                    await asyncio.sleep(0.2)
        except TimeoutError:
            logger.warning("Redis at %s does not answer yet; carrying on and retrying", _safe(self.url))
        self._tasks.append(asyncio.create_task(self._probe(), name=f"{self.name}-probe"))
        if self._subscribers:
            self._tasks.append(asyncio.create_task(self._listen(), name=f"{self.name}-pubsub"))

    async def close(self) -> None:
        await cancel_all(self._tasks)
        await self._held.close()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    def subscribe(self, channel: str, handler: Callable[[bytes], None]) -> None:
        """Call ``handler(message)`` for each message on ``channel`` (before :meth:`start`)."""
        self._subscribers[channel] = handler

    def on_reconnect(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when Redis answers again after being unreachable."""
        self._on_reconnect.append(callback)

    async def script(self, name: str, keys: list[str], args: list) -> object:
        """Run script ``name`` (its answer; an error raised as :class:`ClusterUnavailable`)."""
        answers = await self._run([self._evalsha(name, keys, args)], transaction=False)
        raise_errors(answers)
        return answers[0]

    async def command(self, *args) -> object:
        """One command on a held connection: its raw reply (an error raised as
        :class:`ClusterUnavailable`). For the blocking reads each task's hand-over waits on
        (a gateway's delivery list, a worker's inbox)."""
        answers = await guarded(self._held.run([args]))
        raise_errors(answers)
        return answers[0]

    def queue(self, pipe: Pipeline, name: str, keys: list[str], args: list) -> None:
        """Queue script ``name`` on ``pipe`` as a bare ``EVALSHA`` (run it with :meth:`execute`)."""
        pipe.pipeline_execute_command(*self._evalsha(name, keys, args))

    def _evalsha(self, name: str, keys: list[str], args: list) -> tuple:
        return ("EVALSHA", self.scripts[name].sha, len(keys), *keys, *args)

    async def execute(self, pipe: Pipeline, *, raise_on_error: bool = True) -> list:
        """Run the commands queued on ``pipe``; their answers, in order (errors in their
        places when not ``raise_on_error``, else the first one raised as
        :class:`ClusterUnavailable`)."""
        commands = [command for command, _ in pipe.command_stack]
        answers = await self._run(commands, transaction=pipe.is_transaction)
        if raise_on_error:
            raise_errors(answers)
        return answers

    async def _run(self, commands: list[tuple], *, transaction: bool) -> list:
        """Redis answers ``NOSCRIPT`` only when it lost its scripts (it restarted): then
        they are loaded, and the commands that got it, which had not run, run again in
        order, in a pipeline of the same kind."""
        answers = await guarded(self._held.run(commands, transaction=transaction))
        again = [i for i, answer in enumerate(answers) if isinstance(answer, NoScriptError)]
        if again:
            for script in self.scripts.values():
                await guarded(self.redis.script_load(script.script))
            redone = await guarded(self._held.run([commands[i] for i in again], transaction=transaction))
            for i, answer in zip(again, redone):
                answers[i] = answer
        return answers

    # Health

    async def _ping(self) -> bool:
        try:
            async with asyncio.timeout(2):
                await self.redis.ping()
        except (RedisError, OSError, TimeoutError):
            return False
        self._answered_at = time.monotonic()
        return True

    async def _probe(self) -> None:
        while True:
            if await self._ping():
                if self._was_down:
                    self._was_down = False
                    logger.warning("Redis answers again")
                    for callback in self._on_reconnect:
                        callback()
            elif not self._was_down and not self.healthy:
                self._was_down = True
                logger.error("Redis at %s is unreachable", _safe(self.url))
            await asyncio.sleep(PROBE_EVERY)

    # Pub/sub

    async def _listen(self) -> None:
        delay = 0.1
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(*self._subscribers)
                delay = 0.1
                while True:
                    # Blocking (timeout None) wakes on a message at once; with a timeout,
                    # redis-py polls, which doubled the hop (0.26 → 0.52 ms here). A hint
                    # lost to a silent connection is covered by the readers' sweeps.
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if message is None:
                        continue
                    handler = self._subscribers.get(message["channel"].decode())
                    if handler is not None:
                        try:
                            handler(message["data"])
                        except Exception:
                            logger.exception("a pub/sub handler failed")
            except (RedisError, OSError) as exc:
                logger.debug("pub/sub connection lost (%s); reconnecting in %.1f s", exc, delay)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 5.0)


class HeldConnections:
    """Pipelines sent on connections this link holds itself, outside redis-py's pool
    and ``Pipeline.execute``: they were half the cost of the two round trips every task
    makes (the admission, the finish). Measured: 345-400 µs of CPU per three-command
    pipeline through redis-py, 150-200 µs this way (``benchmarks/README.md``). The
    replies are raw (no response callbacks: callers read scripts' answers and errors).

    A connection whose state is unknown (an error or a cancellation mid-exchange) is
    closed, never reused. At most ``most`` are in use at once; more pipelines wait."""

    def __init__(self, pool: aioredis.ConnectionPool, most: int = 16) -> None:
        self.pool = pool
        self._slots = asyncio.Semaphore(most)
        self._idle: list = []

    async def run(self, commands: list[tuple], *, transaction: bool = False) -> list:
        """The reply to each command, in order; an error reply in its place (an exception)."""
        async with self._slots:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else self.pool.make_connection()
            try:
                return await self._exchange(conn, commands, transaction)
            except RedisConnectionError:
                if not reused:
                    raise
                # Idle, it may have been closed by Redis (a restart): then nothing ran.
                return await self._exchange(self.pool.make_connection(), commands, transaction)

    async def _exchange(self, conn, commands: list[tuple], transaction: bool) -> list:
        sent = [("MULTI",), *commands, ("EXEC",)] if transaction else commands
        try:
            await conn.send_packed_command(_pack(sent, conn.encoder.encode), check_health=False)
            replies = []
            for _ in sent:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as error:
                    replies.append(error)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        self._idle.append(conn)
        if not transaction:
            return replies
        done = replies[-1]
        if isinstance(done, Exception) or done is None:  # EXECABORT (or WATCH): nothing ran
            return [done or ResponseError("EXEC: transaction aborted")] * len(commands)
        return list(done)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await conn.disconnect()


def _pack(commands: list[tuple], encode: Callable[[object], bytes]) -> list[bytes]:
    """Commands in RESP: a few buffers (large values, such as images, not copied)."""
    chunks: list[bytes] = []
    small = bytearray()
    for command in commands:
        small += b"*%d\r\n" % len(command)
        for arg in command:
            value = arg if isinstance(arg, bytes) else encode(arg)
            small += b"$%d\r\n" % len(value)
            if len(value) > 6000:
                chunks += [bytes(small), value]
                small = bytearray(b"\r\n")
            else:
                small += value
                small += b"\r\n"
    chunks.append(bytes(small))
    return chunks


def _safe(url: str) -> str:
    """A Redis URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
