"""Smart Turn v3.2 turn detector for realtime-engine-host (plugin component ``smart-turn``).

At a pause in speech the host asks whether the speaker has finished the turn or only paused
mid-sentence. Smart Turn (Daily / pipecat, BSD-2-Clause) answers from the audio itself, intonation
and an unfinished phrase included, which a silence length alone cannot. The int8 CPU model comes
from the pipecat-ai wheel through ``engine-host models install smart-turn-v3.2``; an engine names
it ``model: "model:smart-turn-v3.2"`` (or a path to an ``.onnx`` file or a directory holding one).
"""

from __future__ import annotations

from pathlib import Path

from host.hookspecs import hookimpl

from .detector import SmartTurnDetector, UnsupportedModel

__all__ = ["OPTIONS_SCHEMA", "SmartTurnDetector", "UnsupportedModel", "build", "model_file"]

MODEL = "smart-turn-v3.2"

OPTIONS_SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"type": "string", "minLength": 1, "default": f"model:{MODEL}",
                  "description": "model:<name> of a model installed by `engine-host models install`, or the path "
                                 "of an .onnx file (or of a directory holding one)."},
        "threads": {"type": "integer", "minimum": 1, "maximum": 64, "default": 1,
                    "description": "onnxruntime intra-op threads per inference."},
        "max_batch": {"type": "integer", "minimum": 1, "maximum": 256, "default": 16,
                      "description": "the most turns one onnxruntime run takes when several sessions ask at once."},
    },
    "additionalProperties": False,
}


def model_file(reference: str) -> Path:
    """The ``.onnx`` file that ``reference`` (``model:<name>``, a file or a directory) names.

    A model that is not installed fails with the command that installs it."""
    from host import model_files

    if reference.startswith(model_files.PREFIX):
        where = model_files.resolve(reference)  # ModelFileError naming `engine-host models install <name>`
    else:
        where = Path(reference).expanduser()
        if not where.exists():
            raise FileNotFoundError(f"{where} does not exist; install the model with: engine-host models install {MODEL} "
                                    f"and name it model:{MODEL}")
    if where.is_file():
        return where
    found = sorted(where.glob("*.onnx"))
    if len(found) != 1:
        what = "no .onnx file" if not found else f"{len(found)} .onnx files ({', '.join(p.name for p in found)})"
        raise FileNotFoundError(f"{where} holds {what}; name the file itself, or run: engine-host models install {MODEL}")
    return found[0]


def build(options: dict, context) -> SmartTurnDetector:
    path = model_file(options["model"])
    threads, max_batch = options["threads"], options["max_batch"]
    return context.shared(("smart-turn", str(path.resolve()), threads, max_batch),
                          lambda: SmartTurnDetector(path, threads=threads, max_batch=max_batch))


@hookimpl
def register_turn_detector(register):
    register("smart-turn", build, OPTIONS_SCHEMA)
