"""OpenAI-style chat messages in, the processor's chat format and images out, with every input checked first.

Images come as ``image_url`` parts holding ``data:image/...;base64,`` URLs; a local path (or ``file://`` URL)
only when the server allows it. Anything that cannot work raises `RequestError` with the HTTP status a server
answers with and the parameter at fault.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

ROLES = ("system", "user", "assistant")
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")


class RequestError(ValueError):
    """A request that cannot be served as given: `status` (4xx), a message naming the problem and what to do, and
    the parameter at fault (OpenAI's error ``param``)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass
class ImageLimits:
    """What one request may send: images per request, bytes and pixels per image, local files or not."""

    max_images: int = 4
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 4096 * 4096
    allow_local_files: bool = False


def load_image(url: str, limits: ImageLimits, param: str) -> Image.Image:
    """An RGB image from a data URL (or, if allowed, a local path / file:// URL), checked against `limits`."""
    if not isinstance(url, str) or not url:
        raise RequestError("image_url.url must be a non-empty string (a data:image/...;base64, URL).", param=param)
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise RequestError("The image data URL must read data:image/<type>;base64,<data>.", param=param)
        if not header[5:].startswith("image/"):
            raise RequestError(f"The data URL holds {header[5:].split(';')[0] or 'no type'}, not an image.", param=param)
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise RequestError(f"The image is larger than the server's limit of {limits.max_image_bytes} bytes.",
                               status=413, param=param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("The image's base64 data is malformed.", param=param) from None
    elif url.startswith(("http://", "https://")):
        raise RequestError("This server does not fetch images from the web: send the image as a "
                           "data:image/<type>;base64, URL.", param=param)
    else:
        if not limits.allow_local_files:
            raise RequestError("Local image paths are off on this server (start it with --allow-local-images): "
                               "send the image as a data:image/<type>;base64, URL.", param=param)
        path = Path(url[len("file://"):] if url.startswith("file://") else url)
        if not path.is_file():
            raise RequestError(f"Image file not found: {path}.", param=param)
        if path.stat().st_size > limits.max_image_bytes:
            raise RequestError(f"The image is larger than the server's limit of {limits.max_image_bytes} bytes.",
                               status=413, param=param)
        data = path.read_bytes()
    if len(data) > limits.max_image_bytes:
        raise RequestError(f"The image is larger than the server's limit of {limits.max_image_bytes} bytes.",
                           status=413, param=param)
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in IMAGE_FORMATS:
            raise RequestError(f"Unsupported image format {image.format}: send one of {', '.join(IMAGE_FORMATS)}.",
                               status=415, param=param)
        if image.width * image.height > limits.max_image_pixels:
            raise RequestError(f"The image has {image.width}x{image.height} pixels, more than the server's limit of "
                               f"{limits.max_image_pixels}.", status=413, param=param)
        image.load()
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError):
        raise RequestError("The image could not be decoded (not a supported image file, or truncated).",
                           status=415, param=param) from None
    return image.convert("RGB")


def to_chat(messages, limits: ImageLimits) -> tuple[list[dict], list[Image.Image]]:
    """(messages in the processor's chat format, the images in order) from OpenAI-style `messages`."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects.", param="messages")
    chat, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with role and content.", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role is {role!r}: expected one of {', '.join(ROLES)}.", param=f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list) and content:
            parts = []
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    if role != "user":
                        raise RequestError(f"{at}: only user messages may hold images.", param=at)
                    image_url = part.get("image_url")
                    url = image_url.get("url") if isinstance(image_url, dict) else image_url
                    if len(images) >= limits.max_images:
                        raise RequestError(f"More than {limits.max_images} images in one request (the server's limit).",
                                           status=413, param=at)
                    images.append(load_image(url, limits, at))
                    parts.append({"type": "image"})
                else:
                    raise RequestError(f"{at} must be {{'type': 'text', 'text': ...}} or "
                                       "{'type': 'image_url', 'image_url': {'url': ...}}.", param=at)
        else:
            raise RequestError(f"{where}.content must be a string or a non-empty list of parts.",
                               param=f"{where}.content")
        chat.append({"role": role, "content": parts})
    if chat[-1]["role"] != "user":
        raise RequestError("The last message must come from the user (the model answers it).", param="messages")
    return chat, images


__all__ = ["ImageLimits", "RequestError", "load_image", "to_chat"]
