"""Redis worker registry for realtime-engine-host (component ``redis``).

Writes the worker to ``{prefix}:worker:{id}`` (a hash whose TTL is three
heartbeats, so a dead worker disappears), keeps ``{prefix}:workers`` (a set of
worker ids) and appends ended sessions to the capped stream
``{prefix}:sessions``. Selected by ``REDIS_URL`` (or ``--registry redis``).

This is the first cut: routing and reservation come with the router.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

from host.contracts import SessionRecord, WorkerInfo, WorkerStatus
from host.hookspecs import hookimpl

OPTIONS_SCHEMA = {
    "type": "object",
    "required": ["url"],
    "properties": {
        "url": {"type": "string", "minLength": 1},
        "key_prefix": {"type": "string", "default": "dalston:realtime"},
        "ttl_s": {"type": "number", "exclusiveMinimum": 0, "default": 30},
        "max_session_records": {"type": "integer", "minimum": 1, "default": 10000},
    },
    "additionalProperties": False,
}


class RedisRegistry:
    def __init__(self, url: str, key_prefix: str, ttl_s: float, max_session_records: int):
        import redis.asyncio as redis

        self.client = redis.from_url(url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5)
        self.prefix = key_prefix
        self.ttl_ms = int(ttl_s * 1000)
        self.max_records = max_session_records
        self.worker_id: str | None = None

    def _key(self) -> str:
        return f"{self.prefix}:worker:{self.worker_id}"

    async def register(self, info: WorkerInfo) -> None:
        self.worker_id = info.worker_id
        fields = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in asdict(info).items()}
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(), mapping=fields)
            pipe.pexpire(self._key(), self.ttl_ms)
            pipe.sadd(f"{self.prefix}:workers", info.worker_id)
            await pipe.execute()

    async def heartbeat(self, status: WorkerStatus) -> None:
        fields = {
            "status": status.status,
            "active_sessions": str(status.active_sessions),
            "capacity": str(status.capacity),
            "memory": json.dumps(status.memory),
            "last_heartbeat": f"{time.time():.3f}",
        }
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.exists(self._key())
            pipe.hset(self._key(), mapping=fields)
            pipe.pexpire(self._key(), self.ttl_ms)
            exists, *_ = await pipe.execute()
        if not exists:
            # The key expired or Redis restarted empty: the caller re-registers us.
            raise ConnectionError("worker record was missing in Redis")

    async def session_ended(self, record: SessionRecord) -> None:
        fields = {k: "" if v is None else str(v) for k, v in asdict(record).items()}
        await self.client.xadd(f"{self.prefix}:sessions", fields, maxlen=self.max_records, approximate=True)

    async def deregister(self) -> None:
        if self.worker_id is None:
            return
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.delete(self._key())
            pipe.srem(f"{self.prefix}:workers", self.worker_id)
            await pipe.execute()
        await self.client.aclose()


@hookimpl
def register_registry(register):
    register("redis", lambda options, context: RedisRegistry(**options), OPTIONS_SCHEMA)
