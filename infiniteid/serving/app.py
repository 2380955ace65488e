"""``create_app``: the FastAPI application of ``infiniteid serve``.

Routes: ``POST /v1/generate`` (JSON or multipart; PNG, or JSON on
``Accept: application/json``), ``GET /healthz`` (alive), ``GET /readyz`` (bundle
loaded and warm-up done), ``GET /metrics`` (Prometheus), ``GET /`` (the page),
``/docs`` (OpenAPI). Every error is JSON ``{"error": ..., "field": ...}``.

The bundle loads in the background after start-up, so ``/healthz`` answers at
once and ``/readyz`` turns 200 when the server can generate. Shutdown drains:
requests already admitted are run and answered; new ones are refused.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from contextlib import asynccontextmanager
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Optional

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from .batcher import MicroBatcher, QueueFull, Result
from .config import ServerConfig
from .engine import ServingEngine
from .forms import GenerateJSON, RequestError, parse_json, parse_multipart
from .metrics import ServerMetrics
from .page import render

log = logging.getLogger("infiniteid.serving")


class ServerState:
    """What the routes share: config, metrics, and (once loaded) engine and batcher."""

    def __init__(self, config: ServerConfig, runtime: Any = None, on_fatal: Optional[Callable[[str], None]] = None):
        self.config = config
        self.runtime = runtime  # a ready Runtime (tests, Ray replicas); None: load config.bundle
        self.on_fatal = on_fatal
        self.metrics = ServerMetrics()
        self.engine: Optional[ServingEngine] = None
        self.batcher: Optional[MicroBatcher] = None
        self.ready = False
        self.error: Optional[str] = None
        self.pool = ThreadPoolExecutor(config.encode_threads, thread_name_prefix="infiniteid-request")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.runtime is None:
                engine = await loop.run_in_executor(self.pool, ServingEngine.load, self.config, self.metrics)
            else:
                engine = ServingEngine(self.runtime, self.config, self.metrics)
            if self.config.warmup:
                await loop.run_in_executor(self.pool, engine.warmup)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.error("the server cannot start: %s", self.error)
            if self.on_fatal is not None:
                self.on_fatal(self.error)
            return
        self.engine = engine
        self.batcher = MicroBatcher(engine, self.metrics, self.config.queue, self.config.batch_window_ms / 1000)
        self.batcher.start()
        self.ready = True
        log.info("ready: %s", engine.describe())

    async def stop(self) -> None:
        self.ready = False
        if self.batcher is not None:
            left = await self.batcher.drain(self.config.timeout)
            log.info("drained the queue (%d requests answered 503)", left)
        self.pool.shutdown(wait=False)
        if self.engine is not None and self.runtime is None:
            self.engine.close()


def _error(status: int, message: str, field: Optional[str] = None, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    body: Dict[str, Any] = {"error": message}
    if field:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body in memory, refused (413) past ``limit`` bytes, declared or streamed."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise RequestError(400, "Content-Length is not a number") from None
        if n > limit:
            raise RequestError(413, f"the request body is {n} bytes, the limit is {limit}")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise RequestError(413, f"the request body is over the limit of {limit} bytes")
    return bytes(buf)


def _png(array: Any) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(array).save(b, format="PNG")
    return b.getvalue()


_OPENAPI_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": GenerateJSON.model_json_schema()},
            "multipart/form-data": {"schema": {
                "type": "object",
                "description": "the JSON body's fields as form fields; faces as one or more 'face' files",
                "properties": {"face": {"type": "array", "items": {"type": "string", "format": "binary"}},
                               "prompt": {"type": "string"}},
                "required": ["face", "prompt"],
            }},
        },
    },
    "responses": {"200": {"content": {"image/png": {}, "application/json": {}}, "description": "the image"}},
}


def create_app(config: ServerConfig, runtime: Any = None, on_fatal: Optional[Callable[[str], None]] = None,
               load_in_background: bool = True) -> FastAPI:
    """The application. ``runtime``: a ready :class:`~infiniteid.runtime.Runtime` to serve
    (else ``config.bundle`` is loaded, hashes verified); ``on_fatal(message)`` is called when
    the bundle cannot be loaded (the command uses it to exit). ``load_in_background=False``
    finishes loading and warm-up inside start-up (a Ray Serve replica is ready only then)."""
    config.validate()
    state = ServerState(config, runtime, on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        starting = asyncio.get_running_loop().create_task(state.start())
        if not load_in_background:
            await starting
            if state.error:
                raise RuntimeError(f"the server cannot start: {state.error}")
        yield
        if not starting.done():
            starting.cancel()
        await state.stop()

    app = FastAPI(title="InfiniteID-RT", version="0.1.0", lifespan=lifespan,
                  description="Identity-preserving SDXL (Infinite-ID) on the torch-free runtime.")
    app.state.server = state

    @app.get("/healthz")
    async def healthz() -> Dict[str, Any]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> Response:
        if state.ready and state.engine is not None:
            return JSONResponse({"status": "ready", **state.engine.describe()})
        if state.error:
            return _error(503, f"the server failed to start: {state.error}")
        return _error(503, "loading the bundle and warming up", headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        info = state.engine.describe() if state.engine is not None else {}
        return HTMLResponse(render(info))

    @app.post("/v1/generate", openapi_extra=_OPENAPI_BODY)
    async def generate(request: Request) -> Response:
        """One image. Multipart (``face`` files + fields) or JSON (``faces`` in base64)."""
        t_start = time.perf_counter()
        response = await _generate(request, t_start)
        state.metrics.requests.labels(str(response.status_code)).inc()
        state.metrics.stage.labels("total").observe(time.perf_counter() - t_start)
        return response

    async def _generate(request: Request, t_start: float) -> Response:
        if not state.ready or state.batcher is None or state.engine is None:
            why = f"the server failed to start: {state.error}" if state.error else "the server is not ready yet (loading, warm-up)"
            return _error(503, why, headers={"Retry-After": "5"})
        batcher, engine = state.batcher, state.engine
        try:
            ticket = batcher.admit()
        except QueueFull as e:
            return _error(429, str(e), headers={"Retry-After": str(e.retry_after)})
        except RequestError as e:
            return _error(e.status, str(e), e.field)
        try:
            result = await asyncio.wait_for(_process(request, ticket, batcher, engine), config.timeout)
        except asyncio.TimeoutError:
            return _error(504, f"the request took longer than the server's timeout of {config.timeout:g} s and was dropped")
        except RequestError as e:
            return _error(e.status, str(e), e.field)
        finally:
            ticket.release()
        res, fields, timings = result
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        png = await loop.run_in_executor(state.pool, _png, res.array)
        timings["png"] = round(time.perf_counter() - t0, 4)
        state.metrics.stage.labels("png").observe(timings["png"])
        timings["total"] = round(time.perf_counter() - t_start, 4)
        headers = {"X-Batch-Id": str(res.batch_id), "X-Batch-Size": str(res.batch_size)}
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({
                "image": base64.b64encode(png).decode(),
                "format": "png",
                "request": fields.model_dump(),
                "batch": {"id": res.batch_id, "size": res.batch_size},
                "timings": timings,
            }, headers=headers)
        return Response(png, media_type="image/png", headers=headers)

    async def _process(request: Request, ticket: Any, batcher: MicroBatcher, engine: ServingEngine):
        loop = asyncio.get_running_loop()
        timings: Dict[str, float] = {}
        body = await _read_body(request, config.max_upload_bytes)
        ctype = request.headers.get("content-type", "")
        t0 = time.perf_counter()
        if ctype.startswith("multipart/form-data"):
            parsed = await loop.run_in_executor(state.pool, parse_multipart, body, ctype, config.max_pixels,
                                                config.max_prompt_chars, config.max_faces)
        elif ctype.startswith("application/json"):
            parsed = await loop.run_in_executor(state.pool, parse_json, body, config.max_pixels,
                                                config.max_prompt_chars, config.max_faces)
        else:
            raise RequestError(415, f"send multipart/form-data or application/json, not {ctype or 'no Content-Type'!r}")
        timings["decode"] = round(time.perf_counter() - t0, 4)
        state.metrics.stage.labels("decode").observe(timings["decode"])
        t0 = time.perf_counter()
        prepared = await loop.run_in_executor(state.pool, engine.prepare, parsed.fields, parsed.faces)
        timings["identity"] = round(time.perf_counter() - t0, 4)
        t0 = time.perf_counter()
        future = batcher.submit(prepared, ticket)
        try:
            res: Result = await asyncio.shield(future)
        except asyncio.CancelledError:
            future.cancel()  # the caller timed out: the batcher drops it unless its batch already runs
            raise
        timings["batch"] = round(time.perf_counter() - t0, 4)
        timings.update({f"batch_{k}": v for k, v in res.timings.items()})
        return res, parsed.fields, timings

    return app
