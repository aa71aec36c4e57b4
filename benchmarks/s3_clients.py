"""Which S3 client the image store uses: obstore against aiobotocore, side by side.

    python benchmarks/s3_clients.py            # 2 MB objects: latency, throughput, CPU per request
    python benchmarks/s3_clients.py --smoke    # seconds, for CI

Against moto's server mode (a real S3 API on 127.0.0.1, started here, stopped by its
PID), with each client as the image store would use it: a PUT with the media type and
one user-metadata field, a GET read whole, a GET streamed in chunks, a presigned URL.
The clients take turns round by round (A B A B …) so that the shared machine's noise
falls on both alike, and the ratios (aiobotocore / obstore) are what to read:

- **latency**: one request at a time, p50 and p99 (ms);
- **throughput**: ``--concurrency`` requests in flight, MB/s;
- **CPU per request**: this process's user + system CPU time (every thread, so
  obstore's Rust runtime counts too) over the requests (ms). moto's own CPU is not
  counted: it is the same server for both.

moto is a Python server and dominates the wall-clock figures; the CPU per request is
the client's own cost, which is what a gateway serving images pays.
Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.s3_harness import CREDENTIALS, MotoServer  # noqa: E402

BUCKET = "bench"
OPS = ("put", "get", "get_stream", "presign")


def cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class ObstoreClient:
    name = "obstore"

    def __init__(self, endpoint: str) -> None:
        import obstore
        from obstore.store import S3Store

        self.obstore = obstore
        self.store = S3Store(
            BUCKET,
            endpoint=endpoint,
            region=CREDENTIALS["AWS_DEFAULT_REGION"],
            client_options={
                "allow_http": True,
                "timeout": "30s",
                "connect_timeout": "2s",
                "pool_max_idle_per_host": "64",
            },
        )

    async def put(self, key: str, data: bytes) -> None:
        await self.obstore.put_async(
            self.store, key, data, attributes={"Content-Type": "image/png", "expires-at": "1"}
        )

    async def get(self, key: str) -> int:
        result = await self.obstore.get_async(self.store, key)
        return len(await result.bytes_async())

    async def get_stream(self, key: str) -> int:
        result = await self.obstore.get_async(self.store, key)
        return sum([len(chunk) async for chunk in result.stream(min_chunk_size=256 * 1024)])

    async def presign(self, key: str) -> int:
        return len(await self.obstore.sign_async(self.store, "GET", key, timedelta(seconds=3600)))

    async def close(self) -> None:
        return None


class BotocoreClient:
    name = "aiobotocore"

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.client = None
        self._context = None

    async def open(self) -> None:
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        config = AioConfig(
            connect_timeout=2, read_timeout=30, max_pool_connections=64, signature_version="s3v4"
        )
        self._context = get_session().create_client(
            "s3", endpoint_url=self.endpoint, region_name=CREDENTIALS["AWS_DEFAULT_REGION"], config=config
        )
        self.client = await self._context.__aenter__()

    async def put(self, key: str, data: bytes) -> None:
        await self.client.put_object(
            Bucket=BUCKET, Key=key, Body=data, ContentType="image/png", Metadata={"expires-at": "1"}
        )

    async def get(self, key: str) -> int:
        response = await self.client.get_object(Bucket=BUCKET, Key=key)
        async with response["Body"] as body:
            return len(await body.read())

    async def get_stream(self, key: str) -> int:
        response = await self.client.get_object(Bucket=BUCKET, Key=key)
        total = 0
        async with response["Body"] as body:
            async for chunk in body.iter_chunks(256 * 1024):
                total += len(chunk)
        return total

    async def presign(self, key: str) -> int:
        url = await self.client.generate_presigned_url(
            "get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=3600
        )
        return len(url)

    async def close(self) -> None:
        await self._context.__aexit__(None, None, None)


async def timed(op, keys: list[str], concurrency: int, payload: bytes) -> dict:
    """Run ``op`` once per key, ``concurrency`` at a time: latencies, wall time, CPU."""
    latencies: list[float] = []
    queue = list(keys)

    async def lane() -> None:
        while queue:
            key = queue.pop()
            started = time.perf_counter()
            await (op(key, payload) if payload else op(key))
            latencies.append(time.perf_counter() - started)

    cpu, wall = cpu_now(), time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return {"latencies": latencies, "wall": time.perf_counter() - wall, "cpu": cpu_now() - cpu}


async def one_round(client, op: str, round_no: int, args, payload: bytes) -> dict:
    keys = [f"{client.name}/{i}" for i in range(args.objects)]
    method = getattr(client, op)
    data = payload if op == "put" else b""
    sequential = await timed(method, keys, 1, data)
    parallel = await timed(method, keys, args.concurrency, data)
    return {"sequential": sequential, "parallel": parallel}


def summarize(rounds: list[dict], op: str, size: int) -> dict:
    seq = [x for r in rounds for x in r["sequential"]["latencies"]]
    par_wall = sum(r["parallel"]["wall"] for r in rounds)
    par_count = sum(len(r["parallel"]["latencies"]) for r in rounds)
    cpu = sum(r["sequential"]["cpu"] + r["parallel"]["cpu"] for r in rounds)
    count = len(seq) + par_count
    moved = size * par_count if op != "presign" else 0
    return {
        "p50_ms": round(statistics.median(seq) * 1000, 3),
        "p99_ms": round(_quantile(seq, 0.99) * 1000, 3),
        "throughput_mb_s": round(moved / par_wall / 2**20, 1) if moved else None,
        "requests_per_s": round(par_count / par_wall, 1),
        "cpu_ms_per_request": round(cpu / count * 1000, 3),
        "requests": count,
    }


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main_async(args) -> dict:
    os.environ.update(CREDENTIALS)  # both clients read credentials from the environment
    payload = os.urandom(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        moto = MotoServer(Path(tmp)).start()
        try:
            moto.create_bucket(BUCKET)
            obstore_client = ObstoreClient(moto.url)
            boto_client = BotocoreClient(moto.url)
            await boto_client.open()
            clients = [obstore_client, boto_client]
            for client in clients:  # warm-up: connections, imports, the objects the GETs read
                await one_round(client, "put", -1, args, payload)
            raw: dict[str, dict[str, list]] = {c.name: {op: [] for op in OPS} for c in clients}
            for round_no in range(args.rounds):
                for op in OPS:
                    order = clients if round_no % 2 == 0 else clients[::-1]
                    for client in order:
                        raw[client.name][op].append(await one_round(client, op, round_no, args, payload))
            await boto_client.close()
        finally:
            moto.stop()
    results = {
        name: {op: summarize(rounds, op, args.size) for op, rounds in ops.items()}
        for name, ops in raw.items()
    }
    ratios = {
        op: {
            metric: round(results["aiobotocore"][op][metric] / results["obstore"][op][metric], 2)
            for metric in ("p50_ms", "p99_ms", "cpu_ms_per_request", "requests_per_s")
            if results["obstore"][op][metric]
        }
        for op in OPS
    }
    return {
        "object_bytes": args.size,
        "objects_per_round": args.objects,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "server": "moto server mode on 127.0.0.1",
        "results": results,
        "ratios_aiobotocore_over_obstore": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=2 * 2**20, help="object size in bytes")
    parser.add_argument("--objects", type=int, default=16, help="objects per round and client")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (the clients alternate within each)")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight for the throughput run"
    )
    parser.add_argument("--smoke", action="store_true", help="a few seconds: small objects, one round")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "s3_clients.json"))
    args = parser.parse_args()
    if args.smoke:
        args.size, args.objects, args.rounds, args.concurrency = 64 * 1024, 4, 1, 2
    report = asyncio.run(main_async(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(
        f"\n{args.size / 2**20:.2f} MB objects, {args.rounds} rounds × {args.objects}, concurrency {args.concurrency}"
    )
    print(
        f"{'op':<11} {'client':<12} {'p50 ms':>8} {'p99 ms':>8} {'MB/s':>7} {'req/s':>7} {'CPU ms/req':>11}"
    )
    for op in OPS:
        for name, ops in report["results"].items():
            r = ops[op]
            mbs = "" if r["throughput_mb_s"] is None else f"{r['throughput_mb_s']:.1f}"
            print(
                f"{op:<11} {name:<12} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {mbs:>7} {r['requests_per_s']:>7.1f} {r['cpu_ms_per_request']:>11.3f}"
            )
    print("ratios aiobotocore / obstore:", json.dumps(report["ratios_aiobotocore_over_obstore"]))
    print(f"wrote {out}")
    # obstore's Rust threads can abort a finalizing interpreter (see gateway.__main__._leave).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
