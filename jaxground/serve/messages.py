"""An OpenAI chat-completions request body -> a checked `ChatRequest`.

Everything a client can get wrong is a `RequestError` carrying OpenAI's error shape
({"error": {"message", "type", "param", "code"}}) and an HTTP status: the server answers it
and goes on. Images come only inline, as data URLs (`image_url` parts): the server fetches
nothing and reads no file a request names.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math

from PIL import Image, UnidentifiedImageError

from jaxground.data.processor import IMAGE_TOKEN, to_rgb

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP_SEQUENCES = 4       # OpenAI's limit
MAX_TOP_LOGPROBS = 20        # OpenAI's limit


class RequestError(Exception):
    """A bad request: `status` (4xx), OpenAI's `type`, the offending `param` and a `code`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = (
            message, param, code, status, type)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclasses.dataclass
class ChatRequest:
    """One checked request: the conversation and how to decode its answer."""

    turns: list[tuple[str, str]]   # (user, assistant) pairs; the last assistant text is ""
    system: str | None = None
    image: Image.Image | None = None   # decoded RGB
    model: str | None = None
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None        # None: a fresh random seed
    stop: list[str] = dataclasses.field(default_factory=list)
    stream: bool = False
    include_usage: bool = False    # stream_options.include_usage
    logprobs: bool = False
    top_logprobs: int = 0
    guidance: float | None = None  # extension: grounding-guided decoding's alpha
    flag_threshold: float | None = None  # extension: flag scored tokens below this logit
    patches: bool = False          # extension: per-patch evidence of each token (heatmaps)
    ignore_eos: bool = False       # extension (as vLLM's): answers of exactly max_tokens


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server accepts; each bound is named in the error that enforces it."""

    max_tokens: int = 512          # the compiled decode length (and the default)
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = 64 << 20


def _number(body: dict, name: str, default, lo: float, hi: float, kind=float):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not float(value).is_integer()):
        raise RequestError(f"'{name}' must be {'an integer' if kind is int else 'a number'}, "
                           f"got {value!r}", name)
    if not (lo <= value <= hi) or not math.isfinite(value):
        raise RequestError(f"'{name}' must be in [{lo}, {hi}], got {value!r}", name)
    return kind(value)


def decode_image(url: str, limits: Limits, param: str) -> Image.Image:
    """A data URL (data:image/...;base64,...) -> RGB image, fully decoded."""
    if not isinstance(url, str) or not url.startswith("data:"):
        scheme = url.split(":", 1)[0] if isinstance(url, str) and ":" in url else "no scheme"
        raise RequestError(f"images must be inline data URLs (data:image/png;base64,...); "
                           f"this server fetches nothing ({scheme!r} given)", param,
                           "invalid_image_url")
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise RequestError(f"a data URL must be 'data:image/<type>;base64,...', got "
                           f"{header[:60]!r}", param, "invalid_image_url")
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise RequestError(f"image is larger than the limit of {limits.max_image_bytes} "
                           "bytes", param, "image_too_large", status=413)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RequestError(f"image data URL is not valid base64: {e}", param,
                           "invalid_image") from e
    try:
        image = Image.open(io.BytesIO(data))
        w, h = image.size
        if w * h > limits.max_image_pixels:
            raise RequestError(f"image of {w}x{h} pixels is over the limit of "
                               f"{limits.max_image_pixels} pixels", param, "image_too_large",
                               status=413)
        image.load()
    except RequestError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as e:
        raise RequestError(f"image cannot be decoded: {e}", param, "invalid_image") from e
    return to_rgb(image)


def _content(message: dict, i: int, limits: Limits) -> tuple[str, list[Image.Image]]:
    """A message's text (parts joined by newlines) and its images."""
    content = message.get("content")
    param = f"messages[{i}].content"
    if isinstance(content, str):
        if IMAGE_TOKEN in content:
            raise RequestError(f"{param}: text may not contain {IMAGE_TOKEN!r}: images go in "
                               "image_url parts", param)
        return content, []
    if not isinstance(content, list):
        raise RequestError(f"{param} must be a string or a list of parts", param)
    texts, images = [], []
    for j, part in enumerate(content):
        if isinstance(part, dict) and IMAGE_TOKEN in str(part.get("text", "")):
            raise RequestError(f"{param}[{j}]: text may not contain {IMAGE_TOKEN!r}: images "
                               "go in image_url parts", f"{param}[{j}]")
        p = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(decode_image(url, limits, p))
        else:
            raise RequestError(f"{p} must be {{'type': 'text', 'text': ...}} or "
                               f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}, got "
                               f"type {kind!r}", p)
    return "\n".join(texts), images


def _conversation(messages, limits: Limits):
    """(turns, system, image) from OpenAI messages; consecutive messages of one role join."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", "messages")
    system, said, image = None, [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {list(ROLES)}, got "
                               f"{m.get('role') if isinstance(m, dict) else m!r}",
                               f"messages[{i}].role")
        text, images = _content(m, i, limits)
        role = m["role"]
        if role in ("system", "developer"):
            if said:
                raise RequestError("system messages must come before the conversation",
                                   f"messages[{i}]")
            system = text if system is None else f"{system}\n{text}"
            continue
        if images:
            if role != "user" or image is not None or len(images) > 1 or any(
                    r == "user" for r, _ in said):
                raise RequestError("LLaVA-1.5 sees one image, given in the first user "
                                   "message", f"messages[{i}].content")
            image = images[0]
        if said and said[-1][0] == role:
            said[-1] = (role, f"{said[-1][1]}\n{text}")
        else:
            said.append((role, text))
    if not said or said[0][0] != "user" or said[-1][0] != "user":
        raise RequestError("the conversation must start and end with a user message",
                           "messages")
    answers = [t for r, t in said[1::2]] + [""]
    return list(zip([t for r, t in said[0::2]], answers)), system, image


def parse_request(body, limits: Limits, model_names: tuple[str, ...]) -> ChatRequest:
    """The checked request, or RequestError naming the field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None)
    model = body.get("model")
    if model is None:
        raise RequestError("you must provide a model parameter", "model")
    if model not in model_names:
        raise RequestError(f"the model {model!r} does not exist; this server has "
                           f"{list(model_names)}", "model", "model_not_found", status=404)
    turns, system, image = _conversation(body.get("messages"), limits)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", limits.max_tokens, 1,
                         limits.max_tokens, int)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP_SEQUENCES
            or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError(f"'stop' must be a string or up to {MAX_STOP_SEQUENCES} non-empty "
                           "strings", "stop")
    n = body.get("n", 1)
    if n != 1:
        raise RequestError("only n = 1 is supported", "n")
    stream_options = body.get("stream_options") or {}
    logprobs = body.get("logprobs") or False
    top_logprobs = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, int)
    if top_logprobs and not logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return ChatRequest(
        turns=turns, system=system, image=image, model=model, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 1e-9, 1),
        seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, int), stop=stop,
        stream=bool(body.get("stream")), include_usage=bool(stream_options.get("include_usage")),
        logprobs=bool(logprobs), top_logprobs=top_logprobs,
        guidance=_number(body, "guidance", None, -100, 100),
        flag_threshold=_number(body, "flag_threshold", None, -1e4, 1e4),
        patches=bool(body.get("grounding_patches")),
        ignore_eos=bool(body.get("ignore_eos")))
