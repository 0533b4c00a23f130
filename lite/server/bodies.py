"""Request bodies in: the content type a route takes, JSON parsed off the event loop, multipart counted.

Every refusal here happens before any work: a wrong content type before the body is read, a body
that is not a JSON object (or nests too deep, or holds a number too long for Python, or a lone
surrogate) before any field is looked at, a multipart form with too many parts while it is parsed.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import FormData, UploadFile
from starlette.requests import ClientDisconnect, Request

from lite.server.errors import ApiError, BodyTooLarge

MAX_JSON_DEPTH = 64  # the OpenAI schemas nest 5 deep; anything far deeper is not a request of theirs
JSON_TYPES = ("application/json",)
EDIT_FILES = ("image", "image[]")  # the OpenAI SDK sends one image as `image`, a list as `image[]`


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def require_json(request: Request) -> None:
    """JSON routes take `application/json` only: the "simple" types (text/plain, forms) are what a
    foreign web page can send without a preflight."""
    kind = media_type(request)
    if kind not in JSON_TYPES and not (kind.startswith("application/") and kind.endswith("+json")):
        raise ApiError(f"{request.url.path} takes a JSON body: send 'Content-Type: application/json' "
                       f"(got {kind or 'no content type'!r})", status=415, code="unsupported_media_type")


def _depth_and_text(value: Any) -> None:
    """Walk the parsed JSON (iteratively): refuse deep nesting and strings that are not valid Unicode."""
    stack: list[tuple[Any, int, str]] = [(value, 1, "body")]
    while stack:
        item, depth, where = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels (at {where})")
        if isinstance(item, dict):
            for key, sub in item.items():
                _valid_string(key, f"{where} key")
                stack.append((sub, depth + 1, f"{where}.{key[:40]}"))
        elif isinstance(item, list):
            stack.extend((sub, depth + 1, f"{where}[{i}]") for i, sub in enumerate(item))
        elif isinstance(item, str):
            _valid_string(item, where)


def _valid_string(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(f"{where} holds a lone surrogate ({text[exc.start]!r} at position {exc.start}); "
                       "send valid UTF-8 text", where.removeprefix("body.")) from None


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Bytes -> a JSON object, every failure an ApiError (runs on a worker thread)."""
    if not raw.strip():
        raise ApiError("the request body is empty; send a JSON object")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(f"the JSON body nests too deep; at most {MAX_JSON_DEPTH} levels are accepted") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(f"the request body is not valid JSON ({exc})") from None
    except ValueError as exc:  # e.g. an integer literal over Python's 4300-digit limit
        raise ApiError(f"the request body holds a value that cannot be read ({str(exc).splitlines()[0]})") from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    _depth_and_text(body)
    return body


async def json_body(request: Request) -> dict[str, Any]:
    """The body of a JSON route, parsed off the event loop (a large body must not stall /health)."""
    require_json(request)
    return await request.app.state.server.off_loop(parse_json_object, await request.body())


async def edit_form(request: Request, max_part_bytes: int) -> tuple[dict[str, str], bytes]:
    """`/v1/images/edits`: (the text fields, the one image's bytes). At most one image file and no
    mask: the parts are counted while the form is parsed, and nothing is decoded here."""
    if media_type(request) != "multipart/form-data":
        raise ApiError("images/edits takes multipart/form-data with an 'image' file and a 'prompt'", status=415,
                       code="unsupported_media_type")
    try:
        form: FormData = await request.form(max_files=2, max_fields=32, max_part_size=max_part_bytes)
    except (ClientDisconnect, BodyTooLarge):
        raise
    except Exception as exc:  # noqa: BLE001 - python-multipart's and starlette's parse errors
        raise ApiError(f"cannot parse the multipart form ({type(exc).__name__}: {exc}); send at most one "
                       "'image' file and the text fields") from None
    try:
        if "mask" in form:
            raise ApiError("masks are not supported: Ovis-U1 edits from an instruction alone; send no 'mask' part",
                           "mask")
        files = [v for name in EDIT_FILES for v in form.getlist(name)]
        if len(files) > 1:
            raise ApiError(f"got {len(files)} 'image' parts; an edit takes exactly one image", "image")
        if not files or not isinstance(files[0], UploadFile):
            raise ApiError("'image' is a required file field (multipart/form-data)", "image")
        others = [k for k, v in form.multi_items() if isinstance(v, UploadFile) and k not in EDIT_FILES]
        if others:
            raise ApiError(f"unexpected file part {others[0]!r}; an edit takes one 'image' file", others[0])
        fields: dict[str, str] = {}
        for key, value in form.multi_items():
            if isinstance(value, str):
                if key in fields:
                    raise ApiError(f"the field {key!r} is sent twice; send it once", key)
                fields[key] = value
        return fields, await files[0].read()
    finally:
        await form.close()
