"""The ASR seam: how the host calls a recognizer, and what it checks of the answer.

Every transcription a session asks for goes through an :class:`AsrCall` (a job of the
model's inference queue). The call passes the session's :class:`SessionOptions` to a model
whose ``transcribe`` takes an ``options`` keyword (contract v2; a v1 model without it keeps
working), checks the :class:`AsrResult` it returns, and turns any failure into a
:class:`ComponentFailure` that names the component and its plugin. A model with
``transcribe_many`` gets several calls in one (:func:`transcribe_many`).
"""

from __future__ import annotations

import inspect
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from host import languages
from host.contracts import SAMPLE_RATE, AsrModel, AsrResult, AsrStream, SessionOptions, TranscribeRequest, Word

DEFAULT_MAX_BATCH = 8
"""Requests one ``transcribe_many`` call gets when the model does not say (``max_batch``)."""

ANY = frozenset({"*", "all", "auto"})
"""A model (or engine) that declares one of these takes any language."""


class ComponentFailure(Exception):
    """A plugin's component raised or broke its contract; the message names component and plugin."""

    def __init__(self, component: str, message: str):
        super().__init__(f"{component}: {message}")
        self.component = component
        self.detail = message

    def __reduce__(self):  # copy and pickle with the constructor's arguments
        return type(self), (self.component, self.detail)


def brief(exc: BaseException) -> str:
    """``Type: message`` of an exception (the type alone when it has no message), for one-line errors."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@lru_cache(maxsize=256)
def _takes(function: Any, name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: call it the v1 way
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def takes(model: AsrModel, name: str) -> bool:
    """Whether ``model.transcribe`` accepts the keyword ``name`` (by name or ``**kwargs``): ``options``
    (contract v2) and ``sentence_end`` are optional. pluggy calls hook implementations by their
    parameter names in the same way."""
    return _takes(getattr(type(model), "transcribe", model.transcribe), name)


def takes_options(model: AsrModel) -> bool:
    """Whether ``model.transcribe`` accepts the session's options."""
    return takes(model, "options")


def transcribe(model: AsrModel, request: TranscribeRequest) -> AsrResult:
    """Call ``model.transcribe`` for ``request`` (blocking), with the options and ``sentence_end`` when it
    takes them."""
    extra: dict[str, Any] = {"options": request.options} if takes_options(model) else {}
    if request.sentence_end and takes(model, "sentence_end"):
        extra["sentence_end"] = True
    return model.transcribe(request.audio, language=request.language, word_timestamps=request.word_timestamps,
                            partial=request.partial, **extra)


def detects(model: AsrModel) -> bool:
    """Whether the model reports language probabilities (``detect_language``)."""
    return callable(getattr(model, "detect_language", None))


def decide_language(model: AsrModel, request: TranscribeRequest) -> tuple[TranscribeRequest, languages.Decision | None]:
    """``request`` with its language decided by the host, when the model can say what it hears.

    A request that names its language, or a model without ``detect_language``, is left as it is."""
    if request.language is not None or not detects(model):
        return request, None
    probabilities = model.detect_language(request.audio)  # type: ignore[attr-defined]
    if not isinstance(probabilities, Mapping):
        raise TypeError(f"detect_language returned {type(probabilities).__name__}, not a mapping of probabilities")
    decision = languages.decide(probabilities, request.languages, request.options.previous_language,
                                len(request.audio) / SAMPLE_RATE, partial=request.partial)
    if decision is None:  # none of the candidates is known to the model: let it decide
        return request, None
    return replace(request, language=decision.language), decision


def with_decision(result: AsrResult, decision: languages.Decision | None) -> AsrResult:
    """``result`` carrying the host's language decision."""
    if decision is not None:
        result.language = decision.language
        result.language_probability = round(decision.probability, 4)
    return result


def batch_size(model: AsrModel) -> int:
    """How many requests one call may carry: 1 without ``transcribe_many``, else its ``max_batch``."""
    if not callable(getattr(model, "transcribe_many", None)):
        return 1
    size = getattr(model, "max_batch", DEFAULT_MAX_BATCH)
    return size if isinstance(size, int) and size >= 1 else DEFAULT_MAX_BATCH


def check_result(result: Any, audio_seconds: float) -> AsrResult:
    """``result`` if it keeps the contract, else ``ValueError`` saying how it breaks it.

    A result with words whose times are not finite or run backwards would shift the session's
    timeline, and a non-string text would crash the sender: both are refused here, at the seam.
    """
    if not isinstance(result, AsrResult):
        raise ValueError(f"returned {type(result).__name__}, not an AsrResult")
    if not isinstance(result.text, str):
        raise ValueError(f"AsrResult.text is {type(result.text).__name__}, not str")
    if not isinstance(result.words, list) or not all(isinstance(w, Word) for w in result.words):
        raise ValueError("AsrResult.words must be a list of Word")
    for w in result.words:
        if not (math.isfinite(w.start) and math.isfinite(w.end)) or w.end < w.start or w.start < -0.5 \
                or w.start > audio_seconds + 1.0:
            raise ValueError(f"word {w.word!r} has times {w.start}-{w.end} outside the {audio_seconds:.2f} s of audio")
    if not (isinstance(result.confidence, (int, float)) and math.isfinite(result.confidence)):
        raise ValueError(f"AsrResult.confidence {result.confidence!r} is not a number")
    for name in ("language_probability", "sentence_end"):
        p = getattr(result, name, None)
        if p is not None and not (isinstance(p, (int, float)) and math.isfinite(p) and 0 <= p <= 1):
            raise ValueError(f"AsrResult.{name} {p!r} is not a probability")
    return result


@dataclass(frozen=True)
class AsrCall:
    """One transcription as a job of the inference queue: calling it runs it (blocking)."""

    model: AsrModel
    request: TranscribeRequest
    component: str
    """Who answers, for errors and logs: ``asr 'faster-whisper' (plugin asr_faster_whisper)``."""

    def __call__(self) -> AsrResult:
        try:
            request, decision = decide_language(self.model, self.request)
        except Exception as exc:
            raise ComponentFailure(self.component, f"detect_language raised {brief(exc)}") from exc
        try:
            result = transcribe(self.model, request)
        except Exception as exc:
            raise ComponentFailure(self.component, f"transcribe raised {brief(exc)}") from exc
        try:
            return with_decision(check_result(result, len(request.audio) / SAMPLE_RATE), decision)
        except ValueError as exc:
            raise ComponentFailure(self.component, f"transcribe broke its contract: {exc}") from None


def transcribe_many(calls: Sequence[AsrCall]) -> list[AsrResult | ComponentFailure]:
    """Run calls of one model in one ``transcribe_many`` call (blocking); a result or a failure per call.

    A call that raises fails every request in it; a wrong number of results, or one result that
    breaks the contract, fails only what it has to."""
    if not calls:
        return []
    first = calls[0]
    component = first.component
    try:
        decided = [decide_language(call.model, call.request) for call in calls]
    except Exception as exc:  # noqa: BLE001 - delivered to each session waiting on the batch
        return _failed_batch(calls, component, f"detect_language raised {brief(exc)}", exc)
    try:
        results = first.model.transcribe_many([request for request, _ in decided])  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - delivered to each session waiting on the batch
        return _failed_batch(calls, component, f"transcribe_many raised {brief(exc)}", exc)
    if not isinstance(results, list) or len(results) != len(calls):
        n = len(results) if isinstance(results, list) else type(results).__name__
        return [ComponentFailure(component, f"transcribe_many returned {n} results for {len(calls)} requests") for _ in calls]
    out: list[AsrResult | ComponentFailure] = []
    for call, result, (_, decision) in zip(calls, results, decided):
        try:
            out.append(with_decision(check_result(result, len(call.request.audio) / SAMPLE_RATE), decision))
        except ValueError as exc:
            out.append(ComponentFailure(component, f"transcribe_many broke its contract: {exc}"))
    return out


def _failed_batch(calls: Sequence[AsrCall], component: str, what: str, cause: Exception) -> list[AsrResult | ComponentFailure]:
    failures = [ComponentFailure(component, what) for _ in calls]
    for failure in failures:
        failure.__cause__ = cause
    return list(failures)  # a list of the wider type the signature promises


def streams(model: AsrModel) -> bool:
    """Whether the model is a streaming recognizer (it has ``open_stream``)."""
    return callable(getattr(model, "open_stream", None))


class StreamState:
    """One utterance's stream in a streaming model, and the order of the jobs that feed it.

    Jobs get sequence numbers when they are made; each runs only after every earlier one has run or
    been skipped, so the stream sees its audio in order whatever thread takes which job. A job that
    was withdrawn before it ran is :meth:`skip`-ped (its audio goes into a later job); one that has
    already begun cannot be, and counts.
    """

    def __init__(self, model: AsrModel, component: str, *, language: str | None, word_timestamps: bool,
                 options: SessionOptions):
        self.model = model
        self.component = component
        self._open_args = {"language": language, "word_timestamps": word_timestamps, "options": options}
        self._stream: AsrStream | None = None
        self._fed = 0  # samples fed so far
        self._failure: ComponentFailure | None = None
        self._cv = threading.Condition()
        self._issued = 0
        self._low = 0  # every sequence number below this has run or was skipped
        self._settled: set[int] = set()
        self._claimed: set[int] = set()

    def job(self, audio: Any, *, finish: bool = False, close: bool = False) -> StreamCall:
        """The next job of this stream (made on the event loop, run by an inference thread)."""
        seq, self._issued = self._issued, self._issued + 1
        return StreamCall(self, seq, audio, finish, close)

    def skip(self, call: StreamCall) -> bool:
        """Mark a withdrawn job as done without running it; False if a thread has already begun it."""
        with self._cv:
            if call.seq in self._claimed:
                return False
            self._settle(call.seq)
            return True

    def run(self, call: StreamCall) -> AsrResult | None:
        """Run one job in its turn (blocking)."""
        with self._cv:
            if call.seq in self._settled or call.seq < self._low:
                return None  # skipped while a thread was picking it up
            self._claimed.add(call.seq)
            self._cv.wait_for(lambda: self._low >= call.seq)
        try:
            return self._step(call)
        finally:
            with self._cv:
                self._settle(call.seq)

    def _settle(self, seq: int) -> None:
        """(caller holds the lock)"""
        self._settled.add(seq)
        while self._low in self._settled:
            self._settled.discard(self._low)
            self._low += 1
        self._cv.notify_all()

    def _step(self, call: StreamCall) -> AsrResult | None:
        if self._failure is not None:
            if call.close:
                return None
            raise self._failure  # a stream that failed once is not fed again
        try:
            if call.close:
                closer = getattr(self._stream, "close", None)
                if callable(closer):
                    closer()
                return None
            if self._stream is None:
                self._stream = self.model.open_stream(**self._open_args)  # type: ignore[attr-defined]
            stream = self._stream
            assert stream is not None
            self._fed += len(call.audio)
            result = stream.accept(call.audio) if len(call.audio) else None
            if call.finish:
                result = stream.finish()
        except Exception as exc:
            self._failure = ComponentFailure(self.component, f"stream {'finish' if call.finish else 'accept'} "
                                                             f"raised {brief(exc)}")
            raise self._failure from exc
        if result is None:
            return None
        try:
            return check_result(result, self._fed / SAMPLE_RATE)
        except ValueError as exc:
            self._failure = ComponentFailure(self.component, f"stream broke its contract: {exc}")
            raise self._failure from None


@dataclass(frozen=True)
class StreamCall:
    """One job of a :class:`StreamState`: feed ``audio``, and with ``finish`` ask for the final."""

    state: StreamState
    seq: int
    audio: Any
    finish: bool = False
    close: bool = False

    def __call__(self) -> AsrResult | None:
        return self.state.run(self)


def model_languages(model: AsrModel) -> frozenset[str] | None:
    """The languages a model declares (``None``: it does not say, so nothing is checked)."""
    declared = getattr(model, "languages", None)
    if declared is None:
        return None
    if isinstance(declared, str) or not all(isinstance(x, str) for x in declared):
        raise ValueError(f"languages must be a list of language codes, got {declared!r}")
    return frozenset(declared)


def unsupported_languages(engine_languages: Sequence[str], model: AsrModel) -> list[str]:
    """The engine's declared languages the model does not declare (empty when it serves them all)."""
    served = model_languages(model)
    if served is None or served & ANY or set(engine_languages) & ANY:
        return []  # "*" in the engine: it serves whatever its models declare
    return [lang for lang in engine_languages if lang not in served]


def session_options(config: dict[str, Any], previous_text: str = "", session_id: str = "",
                    previous_language: str | None = None) -> SessionOptions:
    """The :class:`SessionOptions` a session hands its stages."""
    return SessionOptions(config=dict(config), previous_text=previous_text, session_id=session_id,
                          previous_language=previous_language)
