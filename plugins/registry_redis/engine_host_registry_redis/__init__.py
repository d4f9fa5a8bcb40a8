"""Redis worker registry for realtime-engine-host (component ``redis``).

Worker side (:class:`host.contracts.Registry`):

- ``{prefix}:worker:{id}``: a hash with the worker's description and its last
  heartbeat; its TTL is three heartbeats, so a dead worker disappears;
- ``{prefix}:workers``: a set of worker ids (members whose hash expired are
  pruned by readers);
- ``{prefix}:sessions``: a capped stream with one entry per ended session;
- ``{prefix}:resume:{token}``: per open resumable session, a JSON object (``worker_id``, ``endpoint``,
  ``session_id``, ``engine``, ``config``) naming the worker that holds it; written by that worker
  with a TTL of the resume window, renewed while the session lives and deleted when it ends
  (:class:`host.registry.ResumeDirectory`).

Router side (:class:`host.contracts.WorkerDirectory`):

- ``{prefix}:resume:{token}`` read to find the worker holding a session a client resumes;
- ``{prefix}:leases:{id}``: a sorted set of session reservations on the worker,
  scored by expiry time. A Lua script checks capacity and adds a lease in one
  step, so several routers (or one router under a burst) never overbook a worker.

Selected by a ``redis://`` (or ``rediss://``, ``unix://``) registry URL: ``REGISTRY_URL``, or its
former name ``REDIS_URL`` (or ``--registry redis``). Its options (``key_prefix``, ...) can be set with
``ENGINE_HOST_REGISTRY_OPTIONS`` or ``--registry-option KEY=VALUE``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields
from typing import Any, cast

from host.contracts import SessionRecord, WorkerInfo, WorkerRecord, WorkerStatus
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

# KEYS: worker hash, leases zset. ARGV: lease id, lease ttl (ms).
# Returns 1 (reserved), 0 (full), -1 (no such worker), -2 (not ready).
RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'status') ~= 'ready' then return -2 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local capacity = tonumber(redis.call('HGET', KEYS[1], 'capacity') or '0') or 0
local active = tonumber(redis.call('HGET', KEYS[1], 'active_sessions') or '0') or 0
local leased = redis.call('ZCARD', KEYS[2])
if math.max(active, leased) >= capacity then return 0 end
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""

# KEYS: leases zset. ARGV: lease id, lease ttl (ms). Extends a lease that still exists.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  return 1
end
return 0
"""


class RedisRegistry:
    """Both sides of the registry over one redis-py asyncio client."""

    def __init__(self, url: str, key_prefix: str, ttl_s: float, max_session_records: int):
        import redis.asyncio as redis

        self.client = redis.from_url(url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5)
        self.prefix = key_prefix
        self.ttl_ms = int(ttl_s * 1000)
        self.max_records = max_session_records
        self.worker_id: str | None = None
        self._reserve = self.client.register_script(RESERVE)
        self._renew = self.client.register_script(RENEW)

    def _worker_key(self, worker_id: str | None = None) -> str:
        return f"{self.prefix}:worker:{worker_id or self.worker_id}"

    def _leases_key(self, worker_id: str) -> str:
        return f"{self.prefix}:leases:{worker_id}"

    # --- worker side -------------------------------------------------------------

    async def register(self, info: WorkerInfo) -> None:
        self.worker_id = info.worker_id
        fields: dict[Any, Any] = {k: json.dumps(v) if isinstance(v, (list, dict)) else str(v)
                                  for k, v in asdict(info).items()}
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self._worker_key(), mapping=fields)
            pipe.pexpire(self._worker_key(), self.ttl_ms)
            pipe.sadd(f"{self.prefix}:workers", info.worker_id)
            await pipe.execute()

    async def heartbeat(self, status: WorkerStatus) -> None:
        fields: dict[Any, Any] = {
            "status": status.status,
            "active_sessions": str(status.active_sessions),
            "capacity": str(status.capacity),
            "memory": json.dumps(status.memory),
            "last_heartbeat": f"{time.time():.3f}",
        }
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.exists(self._worker_key())
            pipe.hset(self._worker_key(), mapping=fields)
            pipe.pexpire(self._worker_key(), self.ttl_ms)
            exists, *_ = await pipe.execute()
        if not exists:
            # The key expired or Redis restarted empty: the caller re-registers us.
            raise ConnectionError("worker record was missing in Redis")

    async def session_ended(self, record: SessionRecord) -> None:
        fields: dict[Any, Any] = {k: "" if v is None else str(v) for k, v in asdict(record).items()}
        await self.client.xadd(f"{self.prefix}:sessions", fields, maxlen=self.max_records, approximate=True)

    async def deregister(self) -> None:
        if self.worker_id is not None:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.delete(self._worker_key())
                pipe.srem(f"{self.prefix}:workers", self.worker_id)
                await pipe.execute()
        await self.client.aclose()

    def _resume_key(self, token: str) -> str:
        return f"{self.prefix}:resume:{token}"

    async def hold_resume(self, token: str, record: dict[str, Any], ttl_s: float) -> None:
        await self.client.set(self._resume_key(token), json.dumps(record), px=max(1, int(ttl_s * 1000)))

    async def drop_resume(self, token: str) -> None:
        await self.client.delete(self._resume_key(token))

    # --- router side -------------------------------------------------------------

    async def find_resume(self, token: str) -> dict[str, Any] | None:
        raw = await self.client.get(self._resume_key(token))
        if not raw:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        return record if isinstance(record, dict) and record.get("endpoint") else None

    async def workers(self) -> list[WorkerRecord]:
        ids = sorted(cast("set[str]", await self.client.smembers(f"{self.prefix}:workers")))  # decode_responses
        if not ids:
            return []
        now_ms = int(time.time() * 1000)
        async with self.client.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.hgetall(self._worker_key(worker_id))
                pipe.zcount(self._leases_key(worker_id), now_ms, "+inf")
            replies = await pipe.execute()
        records, gone = [], []
        for worker_id, stored, leases in zip(ids, replies[::2], replies[1::2]):
            record = _parse_worker(stored, leases) if stored else None
            if record is None:
                gone.append(worker_id)
            else:
                records.append(record)
        if gone:
            await self.client.srem(f"{self.prefix}:workers", *gone)
        return records

    async def reserve(self, worker_id: str, lease_id: str, ttl_s: float) -> bool:
        keys = [self._worker_key(worker_id), self._leases_key(worker_id)]
        return await self._reserve(keys=keys, args=[lease_id, int(ttl_s * 1000)]) == 1

    async def renew(self, worker_id: str, lease_id: str, ttl_s: float) -> None:
        await self._renew(keys=[self._leases_key(worker_id)], args=[lease_id, int(ttl_s * 1000)])

    async def release(self, worker_id: str, lease_id: str) -> None:
        await self.client.zrem(self._leases_key(worker_id), lease_id)

    async def close(self) -> None:
        await self.client.aclose()


def _parse_worker(h: dict[str, str], leases: int) -> WorkerRecord | None:
    """A worker hash as a :class:`WorkerRecord`; None when it is incomplete (e.g. half-written)."""
    try:
        info: dict[str, Any] = {}
        for f in fields(WorkerInfo):
            raw = h.get(f.name)
            if raw is None:
                if f.name == "catalog":
                    continue  # written by hosts before the catalog existed
                return None
            info[f.name] = json.loads(raw) if f.name in ("engines", "models", "languages", "catalog") else raw
        info["capacity"] = int(info["capacity"])
        info["started_at"] = float(info["started_at"])
        status = WorkerStatus(
            status=h.get("status", "starting"),
            active_sessions=int(h.get("active_sessions", "0")),
            capacity=int(h.get("capacity") or info["capacity"]),
            memory=json.loads(h.get("memory", "{}")),
        )
        return WorkerRecord(WorkerInfo(**info), status, float(h.get("last_heartbeat", "0")), leases)
    except (ValueError, TypeError):
        return None


@hookimpl
def register_registry(register):
    register("redis", lambda options, context: RedisRegistry(**options), OPTIONS_SCHEMA)
