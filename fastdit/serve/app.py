"""The HTTP side of ``fastdit serve``: OpenAI's Videos API on FastAPI, ``/metrics`` and the page.

=========================================  =================================================================
``POST /v1/videos``                        create (multipart form, as the ``openai`` client sends, or JSON)
``GET /v1/videos``                         list: ``after``, ``limit`` (1-100, default 20), ``order`` (asc/desc)
``GET /v1/videos/{id}``                    the video object: status, progress 0-100, error, size, seconds
``GET /v1/videos/{id}/content``            the MP4 once completed
``DELETE /v1/videos/{id}``                 cancel (a running job stops at the next step) and delete
``GET /metrics``                           Prometheus text (fastdit/serve/metrics.py)
``GET /health``                            ``{"status": "ok", ...}`` once the models are loaded
``GET /``                                  the page: a prompt form, the queue with live progress, the videos
=========================================  =================================================================

Every error is OpenAI's error object, ``{"error": {"message", "type", "param", "code"}}``, with a
4xx status for anything the request did wrong (429 when the queue is full, 413 for a body over
``--max-body-mb``); an unexpected server error is a 500 whose message names no internals (the
traceback goes to the server's log only).
"""

import importlib.resources
import json
import logging
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from fastdit.serve.engine import Engine
from fastdit.serve.metrics import CONTENT_TYPE
from fastdit.serve.spec import FIELDS, RequestError, parse_create, png_bytes, read_image
from fastdit.serve.store import JOB_ID, JobRecord

log = logging.getLogger("fastdit.serve")


def video_object(record: JobRecord) -> dict:
    """The OpenAI video object of a stored job (and fastdit's frames / seed / steps / guidance)."""
    spec = record.spec
    return {
        "id": record.id, "object": "video", "created_at": record.created_at, "completed_at": record.completed_at,
        "expires_at": None, "status": record.status, "progress": record.progress, "error": record.error,
        "model": spec["model"], "prompt": spec["prompt"], "seconds": spec["seconds"],
        "size": f"{spec['width']}x{spec['height']}", "remixed_from_video_id": None, "frames": spec["frames"],
        "seed": spec["seed"], "steps": spec["steps"], "guidance": spec["guidance"],
    }  # fmt: skip


class _BodyTooLarge(RequestError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over {limit} bytes (--max-body-mb)", None, "body_too_large")


class _Guard:
    """ASGI middleware: refuses a body over ``limit`` bytes (by its Content-Length before reading, and
    by counting what arrives), and counts every answered request by route template and status."""

    def __init__(self, app, limit: int, engine: Engine):
        self.app, self.limit, self.engine = app, limit, engine

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:  # (the HTTP parser refuses a malformed one)
            error = _BodyTooLarge(self.limit)
            await JSONResponse(error.body(), error.status)(scope, receive, counted_send)
        else:
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.limit:
                        raise _BodyTooLarge(self.limit)
                return message

            await self.app(scope, limited_receive, counted_send)
        route = scope.get("route")
        self.engine.metrics.requests.labels(scope["method"], getattr(route, "path", "unmatched"), str(status[0])).inc()


def _known(engine: Engine, video_id: str) -> JobRecord:
    record = engine.store.get(video_id) if JOB_ID.match(video_id) else None
    if record is None:
        raise RequestError(404, f"No video found with id '{video_id[:80]}'", "video_id", "not_found")
    return record


async def _fields(request: Request, limit: int) -> tuple[dict, bytes | None]:
    """The create request's fields and its ``input_reference`` file's bytes (None without one)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json":
        try:
            fields = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "the body is not valid JSON") from None
        if not isinstance(fields, dict):
            raise RequestError(400, "the JSON body must be an object")
        return fields, None
    if kind not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise RequestError(415, f"send multipart/form-data or application/json, not {kind[:60] or 'no content type'}")
    form = await request.form(max_files=1, max_fields=len(FIELDS) + 1, max_part_size=limit)
    fields, image = {}, None
    for key, value in form.multi_items():
        if key in fields or (key == "input_reference" and image is not None):
            raise RequestError(400, f"'{key[:60]}' is given twice", key[:60])
        if isinstance(value, UploadFile):
            if key != "input_reference":
                raise RequestError(400, f"'{key[:60]}' cannot be a file (only input_reference is)", key[:60])
            image = await value.read()
        else:
            fields[key] = value
    return fields, image


def create_app(engine: Engine, *, max_body_bytes: int = 16 << 20) -> FastAPI:
    """The FastAPI app serving ``engine`` (started and stopped with the app's lifespan)."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="fastdit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, limit=max_body_bytes, engine=engine)
    page = importlib.resources.files("fastdit.serve").joinpath("page.html").read_text()

    @app.exception_handler(RequestError)
    async def request_error(_request, err: RequestError):
        return JSONResponse(err.body(), err.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException):
        message = {404: "Not found", 405: "Method not allowed"}.get(err.status_code, str(err.detail)[:200])
        return JSONResponse(RequestError(err.status_code, message).body(), err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return JSONResponse(RequestError(400, f"{where}: {first.get('msg', 'invalid')}", where or None).body(), 400)

    @app.exception_handler(Exception)
    async def server_error(_request, err: Exception):
        log.error("unexpected error: %s: %s", type(err).__name__, err, exc_info=err)
        body = {"error": {"message": "internal server error (the server's log has the details)",
                          "type": "server_error", "param": None, "code": None}}  # fmt: skip
        return JSONResponse(body, 500)

    @app.post("/v1/videos")
    async def create_video(request: Request):
        engine.check_capacity()  # a full queue is said before the body is read
        fields, image = await _fields(request, max_body_bytes)
        spec = parse_create(fields, image is not None, engine.served, engine.limits)
        if image is not None:
            pixels = await run_in_threadpool(read_image, image, engine.limits)
            spec["input"] = engine.inputs.put(await run_in_threadpool(png_bytes, pixels))
        record = JobRecord(f"video_{uuid.uuid4().hex}", int(time.time()), spec)
        await run_in_threadpool(engine.submit, record)
        return video_object(record)

    @app.get("/v1/videos")
    async def list_videos(after: str | None = None, limit: str = "20", order: str = "desc"):
        if not limit.isdigit() or not 1 <= int(limit) <= 100:
            raise RequestError(400, f"'limit' must be an integer in [1, 100], got {limit[:20]!r}", "limit")
        if order not in ("asc", "desc"):
            raise RequestError(400, f"'order' must be 'asc' or 'desc', got {order[:20]!r}", "order")
        if after is not None:
            _known(engine, after)
        records, more = engine.store.page(after, int(limit), order)
        data = [video_object(r) for r in records]
        return {"object": "list", "data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}  # fmt: skip

    @app.get("/v1/videos/{video_id}")
    async def get_video(video_id: str):
        return video_object(_known(engine, video_id))

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, variant: str = "video"):
        record = _known(engine, video_id)
        if variant != "video":
            raise RequestError(400, f"variant '{variant[:40]}' is not made here; only 'video' (the MP4)", "variant")
        if record.status != "completed":
            raise RequestError(409, f"video {video_id} is {record.status}, not completed", "video_id", "not_ready")
        path = engine.videos.path(record.video)
        if not os.path.isfile(path):
            raise RequestError(410, f"video {video_id}'s file is gone from the store (removed outside the server)",
                               "video_id", "gone")  # fmt: skip
        return FileResponse(path, media_type="video/mp4", filename=f"{video_id}.mp4")

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str):
        _known(engine, video_id)
        if await run_in_threadpool(engine.delete, video_id) is None:  # deleted by another request meanwhile
            _known(engine, video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/health")
    async def health():
        width, height = engine.served.default_size
        return {"status": "ok", "model": engine.served.name, "default_size": f"{width}x{height}",
                "queue_depth": engine.queue_depth(), "ranks": engine.ranks}  # fmt: skip

    @app.get("/")
    async def index():
        return HTMLResponse(page)

    return app
