"""A session's JSON control messages: ``config``, ``flush``, ``clear``, ``end`` (docs/protocol.md,
"Client → server"), and the endpointing that ``config`` may change mid-session."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from host import protocol as msg
from host.endpointing import EndpointingOptions, Event, TurnPolicy
from host.limits import SessionLimits
from host.protocol import MAX_JSON_DEPTH, Close, ConfigError, ErrorCode, nested_deeper_than
from host.session_config import CHANGEABLE, SessionConfig, changeable, check_change, check_language, variant_for

if TYPE_CHECKING:
    from host.audio import AudioBuffer
    from host.decoding import UtteranceDecoder
    from host.limits import TokenBucket
    from host.models import LoadedEngine
    from host.sender import Sender
    from host.services import SessionServices
    from host.vad import VadStage


class SessionControl(SessionLimits):
    """The control-message handlers of a :class:`host.session.Session` (a mixin: they act on its state;
    backpressure before a flush comes from :class:`host.limits.SessionLimits`)."""

    engine: LoadedEngine
    config: SessionConfig
    services: SessionServices
    decoding: UtteranceDecoder
    vad: VadStage
    buffer: AudioBuffer
    out: Sender
    _control_rate: TokenBucket
    _rate_reported: float
    _lock: asyncio.Lock
    _finished: bool

    async def _report(self, code: ErrorCode, message: str, recoverable: bool, **fields: Any) -> None:
        raise NotImplementedError

    async def _handle(self, events: list[Event]) -> None:
        raise NotImplementedError

    def _chain(self, step: Awaitable[Any]) -> None:
        raise NotImplementedError

    async def finish(self, close: Close = msg.NORMAL, linger: bool = True) -> None:
        raise NotImplementedError

    async def _on_text(self, text: str) -> None:
        try:
            if nested_deeper_than(text, MAX_JSON_DEPTH):
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            message = json.loads(text)
        except (ValueError, RecursionError) as exc:
            await self._report(ErrorCode.INVALID_JSON, f"malformed JSON: {str(exc)[:200]}", recoverable=True)
            return
        await self._on_message(message)

    async def _on_message(self, message: Any) -> None:
        """One JSON control message (a parsed text frame, or a dialect's dict)."""
        kind = message.get("type") if isinstance(message, dict) else None
        # `end` always goes through: dropping it would leave the client waiting for session.end.
        if kind != "end" and not self._control_rate.take():
            now = time.monotonic()
            if now - self._rate_reported >= 1.0:  # one error a second, not one per dropped message
                self._rate_reported = now
                await self._report(ErrorCode.RATE_LIMITED, f"more than {self.services.max_control_per_s:g} control "
                                   "messages per second; extra messages are dropped", recoverable=True)
            return
        handlers = {"config": self._on_config, "flush": self._on_flush, "clear": self._on_clear, "end": self._on_end}
        handler = handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            shown = kind if isinstance(kind, str) else "(missing)"
            await self._report(ErrorCode.UNKNOWN_MESSAGE, f"unknown message type {shown!r}; "
                               "expected config, flush, clear or end", recoverable=True)
            return
        await handler(message)

    async def _on_config(self, message: dict) -> None:
        allowed = changeable(self.engine.spec)
        unknown = sorted(set(message) - {"type", *allowed})
        try:
            if unknown:
                raise ConfigError(ascii(unknown[0]), f"cannot be changed during a session (only {', '.join(allowed)} can)")
            model = self._model_for(message)
            changes = {name: check_change(name, message[name], self.engine.spec, model)
                       for name in allowed if name in message and name != "model"}
        except ConfigError as exc:
            await self._report(ErrorCode.INVALID_CONFIG, str(exc), recoverable=True, param=exc.param)
            return
        self.config.model_named = self.config.model_named or "model" in message
        if model != self.config.model:
            variant = self.engine.asr.variants[model]
            self.decoding.use_model(variant, self.services.scheduler.queue_for(variant.key, variant.parallelism))
            self.config.model = self.decoding.config["model"] = model
        if "language" in changes:
            self.decoding.config["language"] = changes.pop("language")
        for name in [n for n in changes if n not in CHANGEABLE]:  # the engine's own: the model's next jobs read them
            self.config.extra[name] = self.decoding.config[name] = changes.pop(name)
        if changes:
            async with self._lock:  # from the next window on
                for name, value in changes.items():
                    setattr(self.config, name, value)
                self.vad.endpointer.configure(*self._endpointing())

    def _model_for(self, message: dict) -> str:
        """The variant the session uses after ``message``: the one it names, else where the session
        never named one and its variant does not serve the new language, the first that does. Raises
        :class:`ConfigError` for a variant that does not serve the session's language."""
        spec = self.engine.spec
        if "model" in message:
            model = check_change("model", message["model"], spec)
            if "language" not in message:
                try:
                    check_language(self.decoding.language, spec, model)
                except ConfigError as exc:
                    raise ConfigError("model", f"{model!r} cannot take the session's language: {exc.reason}") from None
            return model
        if not self.config.model_named and "language" in message:
            return variant_for(spec, self.config.model, message["language"])
        return self.config.model

    def _endpointing(self) -> tuple[EndpointingOptions, TurnPolicy | None]:
        """The session's endpointing options and turn policy (None: the silence timer)."""
        options = self.engine.endpointing
        if self.config.silence_ms is not None:
            options = options.with_silence(self.config.silence_ms / 1000)
        turn = self.config.endpointing == "turn" and self.engine.turn is not None
        return options, options.turn_policy(self.config.eagerness) if turn else None

    async def _on_flush(self, message: dict) -> None:
        await self._room_for_finals()
        async with self._lock:
            if self._finished:
                return
            await self._handle(self.vad.flush())
            self._chain(self.out.send(msg.flush_done()))

    async def _on_clear(self, message: dict) -> None:
        async with self._lock:
            if not self._finished:
                await self._handle(self.vad.clear())
                self.buffer.discard_before(self.buffer.end)

    async def _on_end(self, message: dict) -> None:
        await self.finish(msg.NORMAL)
