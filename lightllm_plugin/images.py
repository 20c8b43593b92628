"""Images of a request: where they come from (data URLs, base64, http(s) URLs of allowed hosts),
how they are checked and decoded (Pillow), and how they become model inputs: the model folder's
own Hugging Face image processor cuts them into patches, and each image's one placeholder token
in the prompt is repeated to its number of image tokens, so the prompt's length (what admission
counts) is known before the request reaches the engine.

Shared by the tokenizer process and the offline `LLM`, so both accept and refuse the same
images; the engine reads only `ImageData`. A ValueError names the image and the problem.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import urllib.parse
import urllib.request
from typing import Any

import msgspec

# the architectures that take images; their config names the placeholder token
_VISION_ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                         "LlavaForConditionalGeneration")
FETCH_TIMEOUT_S = 10.0


class ImageData(msgspec.Struct, kw_only=True):
    """One image of a prompt, preprocessed (tokenizer -> router)."""

    hash: str  # sha256 of the patches and their grid: the embedding cache's and prefix cache's key
    offset: int  # index of the image's first token in the prompt
    num_tokens: int
    grid: list[int]  # (t, h, w) patches
    pixels: bytes  # float32 [t*h*w, patch_dim], in the processor's patch order
    patch_dim: int


# ---- messages ---------------------------------------------------------------------------
def image_source(part: dict[str, Any], where: str) -> str | None:
    """The image a content part carries (a data URL or an http(s) URL), or None for a part that
    is no image. The shapes: OpenAI's {"type": "image_url", "image_url": {"url"}}, LangChain's
    standard blocks {"type": "image", "url" | "base64" | "data", "mime_type"} (and the older
    "source_type"), and {"type": "image", "image": url} as Qwen's own examples write it."""
    kind = part.get("type")
    if kind == "image_url" or (kind is None and "image_url" in part):
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url:
            raise ValueError(f"{where}.image_url.url must be a string (a data: or http(s) URL)")
        return url
    if kind != "image":
        return None
    for key in ("url", "image"):
        if isinstance(part.get(key), str):
            return part[key]
    data = part.get("base64", part.get("data"))
    if isinstance(data, str):
        return f"data:{part.get('mime_type') or 'image/*'};base64,{data}"
    raise ValueError(f"{where}: an image part needs url, base64 or data")


def split_images(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """(messages with each image part replaced by {"type": "image"}, which is what chat templates
    place, the image sources in prompt order)."""
    sources: list[str] = []
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for j, part in enumerate(content):
            source = image_source(part, f"messages[{i}].content[{j}]") if isinstance(part, dict) else None
            if source is None:
                parts.append(part)
            else:
                sources.append(source)
                parts.append({"type": "image"})
        out.append({**message, "content": parts})
    return out, sources


# ---- bytes --------------------------------------------------------------------------------
def _allowed(host: str, allowed: list[str]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == d.lower() or host.endswith("." + d.lower()) for d in allowed)


class _CheckedRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is followed only to an allowed host."""

    def __init__(self, allowed: list[str]):
        self.allowed = allowed

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        host = urllib.parse.urlsplit(newurl).hostname or ""
        if not _allowed(host, self.allowed):
            raise ValueError(f"redirected to {host!r}, which is not in --allowed_media_domains")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(url: str, allowed: list[str] | None, max_bytes: int, timeout: float = FETCH_TIMEOUT_S) -> bytes:
    """The body at an http(s) URL whose host --allowed_media_domains names; the host is checked
    before any connection. At most max_bytes, within `timeout` seconds."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be a data: URL or an http(s) URL")
    if not allowed:
        raise ValueError("image URLs are not fetched by this server (no --allowed_media_domains); send a data: URL")
    if not _allowed(parts.hostname, allowed):
        raise ValueError(f"host {parts.hostname!r} is not in --allowed_media_domains")
    opener = urllib.request.build_opener(_CheckedRedirect(allowed))
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "lightllm-plugin"}), timeout=timeout) as r:
            body = r.read(max_bytes + 1)
    except ValueError:
        raise
    except Exception as exc:  # timeouts, refused connections, HTTP errors
        raise ValueError(f"could not fetch {url[:100]!r}: {exc}") from None
    if len(body) > max_bytes:
        raise ValueError(f"the image at {url[:100]!r} is larger than {max_bytes} bytes")
    return body


def source_bytes(source: str, allowed: list[str] | None, max_bytes: int) -> bytes:
    """The encoded image a source names: a data URL's payload, a bare base64 string (LightLLM's
    `{"type": "base64"}`), or an allowed URL's body."""
    if source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep or not header.endswith(";base64"):
            raise ValueError("a data URL must be data:<mime>;base64,<data>")
        return _b64decode(payload)
    if source.startswith(("http://", "https://")):
        return fetch_url(source, allowed, max_bytes)
    if "://" in source or source.startswith("/"):
        raise ValueError("must be a data: URL or an http(s) URL")
    return _b64decode(source)


def _b64decode(payload: str) -> bytes:
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64 (truncated or corrupted)") from None


def decode_image(data: bytes, max_pixels: int):
    """A Pillow RGB image, refused before decoding when it has more than max_pixels pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ValueError("is not an image Pillow can read") from None
    except Image.DecompressionBombError:
        raise ValueError(f"has more than max_image_pixels={max_pixels} pixels") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(f"is {width}x{height} = {width * height} pixels, more than max_image_pixels={max_pixels}")
    try:
        image.load()
    except Exception:
        raise ValueError("is not a complete image (truncated or corrupted)") from None
    return image.convert("RGB")


# ---- model inputs -------------------------------------------------------------------------
def _processor_class(name: str):
    """The folder's image processor class. transformers 5 keeps a torchvision and a Pillow
    backend of each; without torchvision the Pillow one (`<name>Pil`) is taken."""
    import importlib.util

    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, name + "Pil"):
        return getattr(transformers, name + "Pil")
    if not hasattr(transformers, name):
        raise ValueError(f"image processor {name!r} is not in this transformers")
    return getattr(transformers, name)


class ImageInputs:
    """A model's image preprocessing: `processor` (None: a text-only model, which refuses
    images), the placeholder token it expands, the vision tower's merge size (Qwen2-VL: its
    processor gives the patch grid), or for a LLaVA model (`patch_size` set) the CLIP patch size
    and whether the class token is one of the image's tokens."""

    def __init__(self, processor, image_token_id: int | None, merge: int, limit: int, max_pixels: int,
                 allowed_domains: list[str] | None, max_bytes: int, patch_size: int | None = None,
                 class_token: bool = False):
        self.processor, self.image_token_id, self.merge = processor, image_token_id, merge
        self.limit, self.max_pixels, self.allowed, self.max_bytes = limit, max_pixels, allowed_domains, max_bytes
        self.patch_size, self.class_token = patch_size, class_token

    @classmethod
    def for_model(cls, model_path: str | None, limit: int, max_pixels: int, allowed_domains: list[str] | None,
                  max_bytes: int) -> "ImageInputs":
        """The preprocessing of a model folder (a GGUF file or a text-only folder takes no images)."""
        checks = (limit, max_pixels, allowed_domains, max_bytes)
        config_path = os.path.join(model_path, "config.json") if model_path and os.path.isdir(model_path) else None
        if config_path is None or not os.path.exists(config_path):
            return cls(None, None, 1, *checks)
        with open(config_path, encoding="utf-8") as f:
            cfg = json.load(f)
        if not set(cfg.get("architectures") or ()) & set(_VISION_ARCHITECTURES):
            return cls(None, None, 1, *checks)
        with open(os.path.join(model_path, "preprocessor_config.json"), encoding="utf-8") as f:
            name = json.load(f)["image_processor_type"]
        processor = _processor_class(name).from_pretrained(model_path)
        vision = cfg["vision_config"]
        if "LlavaForConditionalGeneration" in cfg["architectures"]:
            token = cfg.get("image_token_id")
            return cls(processor, cfg.get("image_token_index") if token is None else token, 1, *checks,
                       patch_size=int(vision["patch_size"]),
                       class_token=cfg.get("vision_feature_select_strategy", "default") == "full")
        image_token_id = cfg.get("image_token_id", (cfg.get("text_config") or {}).get("image_token_id"))
        return cls(processor, image_token_id, int(vision.get("spatial_merge_size", 2)), *checks)

    @property
    def takes_images(self) -> bool:
        return self.processor is not None

    def check_count(self, sources: list[str]) -> None:
        """Before the prompt is rendered (a text-only model's template may not take image parts)."""
        if sources and not self.takes_images:
            raise ValueError("images: this model is text-only; it does not take images")
        if len(sources) > self.limit:
            raise ValueError(f"images: {len(sources)} images, more than limit_mm_per_prompt={self.limit}")

    def prepare(self, ids: list[int], sources: list[str], field: str) -> tuple[list[int], list[ImageData]]:
        """The prompt with each image's placeholder expanded to its tokens, and the images."""
        if not sources:
            if self.takes_images and self.image_token_id in ids:
                raise ValueError(f"{field} holds image placeholders but the request has no images")
            return ids, []
        self.check_count(sources)
        placeholders = ids.count(self.image_token_id)
        if placeholders != len(sources):
            raise ValueError(f"{field} has {placeholders} image placeholders for {len(sources)} images")
        images = []
        for i, source in enumerate(sources):
            try:
                images.append(decode_image(source_bytes(source, self.allowed, self.max_bytes), self.max_pixels))
            except ValueError as exc:
                raise ValueError(f"images[{i}] {exc}") from None
        return self._expand(ids, images)

    def _expand(self, ids: list[int], images: list) -> tuple[list[int], list[ImageData]]:
        import numpy as np

        out_ids: list[int] = []
        data: list[ImageData] = []
        placeholder = self.image_token_id
        pending = iter(images)
        for token in ids:
            if token != placeholder:
                out_ids.append(token)
                continue
            batch = self.processor(images=[next(pending)], return_tensors="np")
            pixels = np.ascontiguousarray(batch["pixel_values"], dtype=np.float32)
            if self.patch_size is None:  # Qwen2-VL: patches [t*h*w, patch_dim] and their grid
                grid = [int(v) for v in np.asarray(batch["image_grid_thw"])[0]]
                num_tokens = grid[0] * grid[1] * grid[2] // self.merge**2
            else:  # LLaVA: one [C, H, W] image, cut into patches by the tower
                _, channels, height, width = pixels.shape
                p = self.patch_size
                grid = [1, height // p, width // p]
                num_tokens = grid[1] * grid[2] + (1 if self.class_token else 0)
                pixels = pixels.reshape(-1, channels * p * p)
            raw = pixels.tobytes()
            digest = hashlib.sha256(np.asarray(grid, dtype=np.int64).tobytes() + raw).hexdigest()
            data.append(ImageData(hash=digest, offset=len(out_ids), num_tokens=num_tokens, grid=grid, pixels=raw,
                                  patch_dim=pixels.shape[1]))
            out_ids.extend([placeholder] * num_tokens)
        return out_ids, data
