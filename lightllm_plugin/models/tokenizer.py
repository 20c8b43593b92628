"""Model path resolution and tokenizer loading (HF folders and GGUF files).

Building a tokenizer from GGUF metadata takes transformers ~15 s (it converts the whole
vocabulary and merge list in Python), and every server start, tokenizer process and test
would pay it. The converted tokenizer is therefore saved once into the user cache, keyed
by the file's identity, and later loads read that in well under 2 s.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .default_model import cache_dir, default_model_path, file_lock

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_EXPECTED = ("an HF model folder (holding config.json), a .gguf file, "
             "or a folder holding exactly one .gguf file")
# Exercises byte-level pieces, spaces, digits, non-ASCII and special tokens, so a
# lossy save/reload of the tokenizer shows up as differing ids.
_PROBE = ("<|im_start|>user\nWhat is the capital of France?  1234 été 東京 🙂\t"
          "def f(x):\n    return x<|im_end|>\n")


def _gguf_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".gguf")


def resolve_model_path(model_dir: str | os.PathLike | None) -> tuple[str, str]:
    """Return ``(kind, path)``: ``("hf", folder)`` or ``("gguf", file)``.

    ``None`` means the default model (fetched on first use).
    """
    if model_dir is None:
        return "gguf", default_model_path()
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {str(model_dir)!r}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return "gguf", str(path)
        raise ValueError(f"{str(path)!r} is a file but not a .gguf file; expected {_EXPECTED}")
    if (path / "config.json").is_file():
        return "hf", str(path)
    ggufs = _gguf_files(path)
    if len(ggufs) == 1:
        return "gguf", str(ggufs[0])
    if len(ggufs) > 1:
        names = ", ".join(p.name for p in ggufs)
        raise ValueError(f"{str(path)!r} holds several .gguf files ({names}); pass one file's path")
    raise ValueError(f"{str(path)!r} has no config.json and no .gguf file; expected {_EXPECTED}")


def _tokenizer_source(model_path: str | os.PathLike) -> tuple[str, str]:
    """Like resolve_model_path, but a folder's own tokenizer files win over a .gguf."""
    path = Path(model_path).expanduser()
    if path.is_dir() and any((path / f).is_file() for f in _TOKENIZER_FILES):
        return "hf", str(path)
    return resolve_model_path(path)


def _cache_key(gguf_path: Path) -> str:
    import transformers

    st = gguf_path.stat()
    # The transformers version is part of the key because both the GGUF conversion
    # and the saved format change between releases.
    ident = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return f"{gguf_path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def tokenizer_cache_root() -> Path:
    return cache_dir() / "tokenizers"


def _same_behaviour(a, b) -> bool:
    return (a.encode(_PROBE) == b.encode(_PROBE)
            and a.chat_template == b.chat_template
            and a.eos_token_id == b.eos_token_id
            and a.bos_token_id == b.bos_token_id
            and len(a) == len(b))


def _load_saved(folder: Path):
    """A tokenizer this module saved. Its class is the generic fast one (a GGUF vocabulary
    always converts to it), which loads without AutoTokenizer: the auto classes import
    torch (through transformers' config module), about 2 s of CPU in each tokenizer and
    detokenizer process of every server start."""
    import json

    saved_class = json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    if saved_class in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(folder))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _load_gguf_tokenizer(gguf_path: Path, trust_remote_code: bool):
    final = tokenizer_cache_root() / _cache_key(gguf_path)
    if final.is_dir():
        try:
            return _load_saved(final)
        except Exception as exc:  # a corrupt cache entry must not stop the server
            logger.warning("ignoring unreadable tokenizer cache %s: %s", final, exc)

    final.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(final.parent / f"{final.name}.lock"):
        # Another process may have built it while we waited.
        if final.is_dir():
            try:
                return _load_saved(final)
            except Exception:
                shutil.rmtree(final, ignore_errors=True)

        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, trust_remote_code=trust_remote_code)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
        try:
            tok.save_pretrained(str(tmp))
            reloaded = _load_saved(tmp)
            if _same_behaviour(tok, reloaded):
                os.chmod(tmp, 0o755)  # mkdtemp makes 0700
                # A directory rename is atomic: readers see all of it or none of it.
                os.rename(tmp, final)
            else:
                logger.warning("saved tokenizer for %s differs from the GGUF one; not caching",
                               gguf_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return tok


def load_tokenizer(model_path: str | os.PathLike | None, tokenizer_mode: str = "auto",
                   trust_remote_code: bool = False):
    """A transformers tokenizer for an HF folder, a .gguf file, or a folder with one .gguf.

    ``tokenizer_mode`` is ``"auto"``/``"fast"`` (a fast tokenizer) or ``"slow"`` (HF
    folders only; a GGUF vocabulary always converts to a fast tokenizer).
    """
    if tokenizer_mode not in ("auto", "fast", "slow"):
        raise ValueError(f"tokenizer_mode must be 'auto', 'fast' or 'slow', not {tokenizer_mode!r}")
    kind, path = _tokenizer_source(model_path) if model_path is not None else resolve_model_path(None)
    if kind == "gguf":
        return _load_gguf_tokenizer(Path(path), trust_remote_code)

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        path, use_fast=tokenizer_mode != "slow", trust_remote_code=trust_remote_code)
