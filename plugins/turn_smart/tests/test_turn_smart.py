"""The Smart Turn plugin: its features against an independent reference, the model on real speech,
batching, and the host finding and loading it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from engine_host_turn_smart import OPTIONS_SCHEMA, SmartTurnDetector, UnsupportedModel, build, model_file
from engine_host_turn_smart import features as F
from host.client import read_wav
from host.contracts import LoadContext, TurnDetector
from host.engines import load_engine_file
from host.plugins import load_plugins
from tests.support import ENGINES, ROOT, Utt

RATE = 16000


def samples(utt: Utt) -> np.ndarray:
    audio = read_wav(utt.path)
    assert (audio.sample_rate, audio.channels) == (RATE, 1), utt.path
    return np.frombuffer(audio.pcm, dtype="<i2").astype(np.float32) / 32768.0


def context() -> LoadContext:
    return LoadContext(shared=lambda key, loader: loader(), engine_id="test", plugin="turn_smart")


def defaults(**options) -> dict:
    base = {name: prop["default"] for name, prop in OPTIONS_SCHEMA["properties"].items()}
    return {**base, **options}


@pytest.fixture(scope="module")
def detector() -> SmartTurnDetector:
    # The model is installed by `make install` (`engine-host models install smart-turn-v3.2`); when
    # it is missing this fails with the message that names that command.
    return build(defaults(), context())


@pytest.fixture(scope="module")
def clips(speech) -> dict[str, np.ndarray]:
    return {u.id: samples(u) for u in speech}


# --- (a) features against faster-whisper's own numpy log-mel -----------------------------------


def test_mel_filterbank_matches_faster_whisper():
    from faster_whisper.feature_extractor import FeatureExtractor

    reference = FeatureExtractor.get_mel_filters(RATE, F.N_FFT, n_mels=F.N_MELS)
    assert F.mel_filters().shape == reference.shape == (80, 201)
    np.testing.assert_allclose(F.mel_filters(), reference, rtol=0, atol=1e-8)


@pytest.mark.parametrize("clip", ["1688-142285-0002", "jfk", "1688-142285-0000"])  # 2.8 s (padded), 11 s, 15 s (cut)
def test_log_mel_matches_faster_whisper(clips, clip):
    """faster-whisper's ``FeatureExtractor`` is an independent numpy implementation of Whisper's
    log-mel (the same steps 3-7 as transformers'). Fed the same fitted, normalized 8 s, it agrees.

    Two documented differences are accounted for:

    - its ``__call__`` appends ``padding=160`` zeros by default (Whisper's 30 s convention), which
      gives 801 frames instead of 800; ``padding=0`` gives exactly the 800 the model takes. With the
      default, frames 0-798 still agree and frame 799, whose window reaches past the end of the 8 s
      into the appended zeros instead of the reflected signal, differs;
    - it computes the STFT in float32 (complex64), ours in float64 as transformers' numpy path does:
      the log-mels differ by ~5e-6.
    """
    from faster_whisper.feature_extractor import FeatureExtractor

    audio = clips[clip]
    normalized = F.normalize(F.fit(audio)[None])
    ours = F.log_mel(normalized)[0]
    assert ours.shape == (80, 800) and ours.dtype == np.float32
    assert np.array_equal(ours, F.features([audio])[0])

    extractor = FeatureExtractor(feature_size=80, chunk_length=8)
    reference = extractor(normalized[0].astype(np.float32), padding=0)
    assert reference.shape == (80, 800)
    diff = np.abs(reference - ours)
    print(f"{clip}: max |ours - faster-whisper| = {diff.max():.2e}, mean {diff.mean():.2e}")
    assert diff.max() < 1e-4

    padded = extractor(normalized[0].astype(np.float32))  # default padding=160
    assert padded.shape == (80, 801)
    assert np.abs(padded[:, :799] - ours[:, :799]).max() < 1e-4


def test_fit_keeps_the_last_8_s_and_left_pads(clips):
    long = clips["1688-142285-0000"]  # 15 s
    assert len(long) > F.N_SAMPLES
    assert np.array_equal(F.fit(long), long[-F.N_SAMPLES:])
    short = clips["1688-142285-0002"]  # 2.8 s
    fitted = F.fit(short)
    assert len(fitted) == F.N_SAMPLES
    assert not fitted[:F.N_SAMPLES - len(short)].any() and np.array_equal(fitted[-len(short):], short)
    assert np.array_equal(F.features([short]), F.features([np.concatenate([np.zeros(F.N_SAMPLES - len(short), np.float32), short])]))
    assert np.array_equal(F.features([long]), F.features([long[-F.N_SAMPLES:]]))


def test_features_of_a_batch_are_each_items_own(clips):
    """The clamp to 8 decades below the maximum is per item, not over the batch."""
    a, b = clips["jfk"], clips["1688-142285-0002"] * 0.01
    both = F.features([a, b])
    assert both.shape == (2, 80, 800)
    assert np.array_equal(both[0], F.features([a])[0]) and np.array_equal(both[1], F.features([b])[0])
    assert F.features([]).shape == (0, 80, 800)


def test_silence_and_tiny_audio_give_finite_features():
    for audio in (np.zeros(0, np.float32), np.zeros(5, np.float32), np.zeros(F.N_SAMPLES, np.float32), np.ones(3, np.float32)):
        x = F.features([audio])
        assert x.shape == (1, 80, 800) and np.isfinite(x).all()


# --- (b) the model on real speech: complete turns against turns cut mid-word ------------------

WINDOW = 320  # 20 ms
PAUSE_S = 0.2  # the silence a VAD needs to call a pause before Smart Turn runs (pipecat's stop_secs)


def speech_span(audio: np.ndarray) -> tuple[int, int]:
    """First and last 20 ms window (end exclusive) louder than the clip's noise floor + 15 dB."""
    n = len(audio) // WINDOW
    db = 20 * np.log10(np.sqrt(np.mean(audio[:n * WINDOW].reshape(n, WINDOW) ** 2, axis=1)) + 1e-9)
    loud = np.flatnonzero(db > max(np.percentile(db, 10) + 15, db.max() - 45))
    return int(loud[0]), int(loud[-1]) + 1


def complete_and_cut(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The turn up to its end, and the same turn cut inside a word (the loudest 20 ms between 50 % and
    60 % of its speech), each followed by the same 0.2 s of the clip's own background (no digital
    zeros: a real pause has room noise). Returns both and the cut time in seconds."""
    first, last = speech_span(audio)
    end = min(len(audio), last * WINDOW)
    n = len(audio) // WINDOW
    rms = np.sqrt(np.mean(audio[:n * WINDOW].reshape(n, WINDOW) ** 2, axis=1))
    lo, hi = first + int(0.5 * (last - first)), first + int(0.6 * (last - first))
    cut = (lo + int(np.argmax(rms[lo:hi]))) * WINDOW + WINDOW // 2
    quiet = np.concatenate([audio[:first * WINDOW], audio[end:]])
    pause = np.resize(quiet, int(PAUSE_S * RATE)) if len(quiet) else np.zeros(int(PAUSE_S * RATE), np.float32)
    return np.concatenate([audio[:end], pause]), np.concatenate([audio[:cut], pause]), cut / RATE


def test_complete_turns_score_higher_than_turns_cut_mid_word(detector, speech, clips):
    """Every clip of the speech set (read sentences and clauses, JFK, two spontaneous monologues).

    Measured on 2026-12-02 (onnxruntime 1.32, 48 clips): complete mean 0.66 (31/48 above 0.5),
    cut mid-word mean 0.30 (36/48 below 0.5), complete above cut in 37/48 pairs. Single clips vary
    a lot (a narrator's clause may sound unfinished, an abrupt cut may sound final), so only the
    aggregates are asserted."""
    rows = []
    for utt in speech:
        full, cut, at = complete_and_cut(clips[utt.id])
        p_full, p_cut = detector.probabilities([full, cut])
        rows.append((utt.id, len(full) / RATE, at, p_full, p_cut))
    print(f"\n{'clip':22s} {'turn s':>6s} {'cut s':>6s} {'complete':>8s} {'cut':>6s}")
    for name, seconds, at, p_full, p_cut in rows:
        print(f"{name:22s} {seconds:6.2f} {at:6.2f} {p_full:8.3f} {p_cut:6.3f}")
    complete = np.array([r[3] for r in rows])
    cut = np.array([r[4] for r in rows])
    for name, p in (("complete", complete), ("cut", cut)):
        print(f"{name:8s}: mean {p.mean():.3f} min {p.min():.3f} max {p.max():.3f} "
              f"above 0.5: {(p > 0.5).sum()}/{len(p)}")
    print(f"complete > cut in {(complete > cut).sum()}/{len(rows)} pairs")
    assert len(rows) >= 10
    assert complete.mean() > cut.mean() + 0.2
    assert (complete > 0.5).mean() > 0.55, "most complete turns should score above 0.5"
    assert (cut < 0.5).mean() > 0.6, "most turns cut mid-word should score below 0.5"
    assert (complete > cut).mean() > 0.65


# --- (c) the contract: batches, long and short audio ------------------------------------------


def test_detector_keeps_the_contract(detector):
    assert isinstance(detector, TurnDetector)
    assert detector.max_audio_s == 8.0
    assert detector.dynamic_batch and detector.max_batch == 16
    memory = detector.memory()
    assert memory["bytes"] == detector.path.stat().st_size > 1_000_000 and memory["devices"] == ["cpu"]


def test_probabilities_of_a_batch_equal_each_alone(detector, clips):
    a, b, c = clips["jfk"], clips["1688-142285-0002"], clips["533-1066-0006"][:30000]
    calls = detector.calls
    batch = detector.probabilities([a, b, c])
    assert detector.calls == calls + 1, "three turns take one onnxruntime run"
    alone = [detector.probability(x) for x in (a, b, c)]
    assert all(isinstance(p, float) and 0.0 <= p <= 1.0 for p in batch)
    np.testing.assert_allclose(batch, alone, rtol=0, atol=1e-5)
    assert detector.probabilities([]) == []


def test_batches_larger_than_max_batch_are_split(clips):
    small = build(defaults(max_batch=2), context())
    audios = [clips[k] for k in ("jfk", "1688-142285-0002", "533-1066-0006", "1998-15444-0008", "2414-128291-0003")]
    out = small.probabilities(audios)
    assert small.calls == 3 and len(out) == 5
    np.testing.assert_allclose(out, [small.probability(x) for x in audios], rtol=0, atol=1e-5)


def test_audio_longer_than_8_s_uses_its_last_8_s(detector, clips):
    long = clips["1688-142285-0001"]  # 12.6 s
    assert len(long) > 8 * RATE
    assert detector.probability(long) == pytest.approx(detector.probability(long[-8 * RATE:]), abs=1e-6)
    changed_start = long.copy()
    changed_start[:RATE] = 0.5  # the first second is beyond the model's 8 s
    assert detector.probability(changed_start) == pytest.approx(detector.probability(long), abs=1e-6)


@pytest.mark.parametrize("audio", [np.zeros(0, np.float32), np.zeros(1, np.float32), np.zeros(160, np.float32),
                                   np.full(400, 0.1, np.float32), np.zeros(8 * RATE, np.float32)],
                         ids=["empty", "one-sample", "10ms-silence", "25ms-dc", "8s-silence"])
def test_empty_and_very_short_audio_give_a_probability(detector, audio):
    p = detector.probability(audio)
    assert isinstance(p, float) and 0.0 <= p <= 1.0


def test_a_model_of_another_shape_is_refused(tmp_path):
    from engine_host_vad_silero import packaged_model

    with pytest.raises(UnsupportedModel, match="not a Smart Turn model"):
        SmartTurnDetector(packaged_model("silero_vad.onnx"))
    with pytest.raises(FileNotFoundError, match=re.escape("holds no .onnx file")):
        model_file(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape("engine-host models install smart-turn-v3.2")):
        model_file(str(tmp_path / "missing.onnx"))


def test_model_reference_resolves_to_the_installed_file(detector):
    path = model_file("model:smart-turn-v3.2")
    assert path.is_file() and path.name == "smart-turn-v3.2-cpu.onnx" and path == detector.path
    assert model_file(str(path.parent)) == path and model_file(str(path)) == path


# --- (d) the host finds the plugin and loads an engine with it --------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)


def write_turn_engine(directory: Path, turn: dict) -> Path:
    data = yaml.safe_load((ENGINES / "whisper-streaming.yaml").read_text())
    data["id"] = "whisper-smart-turn"
    data["pipeline"]["turn"] = turn
    # tiny.en alone: Whisper base, a model:... file too, would fail first where MODELS_DIR is empty
    data["capabilities"]["models"] = ["fast"]
    data["config_schema"]["properties"]["model"]["enum"] = ["fast"]
    models = data["pipeline"]["asr"]["options"]["models"]
    data["pipeline"]["asr"]["options"]["models"] = {"fast": models["fast"]}
    directory.mkdir(exist_ok=True)
    path = directory / "smart-turn.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_engine_host_plugins_lists_it():
    out = run_cli("plugins")
    assert out.returncode == 0, out.stderr
    assert "turn_smart  [engine-host-turn-smart 0.1.0]" in out.stdout
    assert "turn_detector: smart-turn" in out.stdout


def test_turn_stage_validates_with_defaults(tmp_path):
    spec, errors = load_engine_file(write_turn_engine(tmp_path, {"plugin": "smart-turn"}), load_plugins())
    assert errors == [], [str(e) for e in errors]
    assert spec is not None
    stage = spec.pipeline["turn"]
    assert stage.plugin == "smart-turn"
    assert stage.options == {"model": "model:smart-turn-v3.2", "threads": 1, "max_batch": 16}

    _, errors = load_engine_file(write_turn_engine(tmp_path, {"plugin": "smart-turn", "options": {"thread": 2}}), load_plugins())
    assert any(e.path.startswith("pipeline.turn.options") for e in errors), [str(e) for e in errors]


def test_validate_load_builds_an_engine_with_smart_turn(tmp_path):
    engines = tmp_path / "engines"
    write_turn_engine(engines, {"plugin": "smart-turn", "options": {"model": "model:smart-turn-v3.2", "threads": 1}})
    out = run_cli("validate", "--load", str(engines))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "loaded" in out.stdout and "1 valid, 0 error(s)" in out.stdout

    missing = run_cli("validate", "--load", str(engines), env={"MODELS_DIR": str(tmp_path / "no-models")})
    assert missing.returncode == 1
    assert "turn plugin 'smart-turn' from 'turn_smart' failed to load" in missing.stdout
    assert "engine-host models install smart-turn-v3.2" in missing.stdout
    assert "Traceback" not in missing.stdout + missing.stderr

