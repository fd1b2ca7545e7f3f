"""The predecessor's (sf_bsread_writer's) REST API, so that DAQ systems written for it
can drive writer 1.

Every command is a put to the writer's PVs in-process (``await pv.write(value)`` runs
the PV's putter, as a Channel Access put does): a CA client sees what a REST client did
and the other way round, and both get the same refusals. Answers are those of the
predecessor: ``{"state": "ok", "status": ...}`` (plus ``parameters`` or
``statistics``), an empty body for the PUT commands, and HTTP 200 with
``{"state": "error", "status": <reason>}`` for every refusal and malformed request.

The STOP PVs complete a put when the file is closed; ``PUT /stop_pulse_id`` and
``PUT /stop_now`` answer once the stop has been taken (or refused), as the predecessor
did, and leave the put to finish by itself. ``GET /stop`` and ``GET /kill`` answer when
the file is closed.

Limits against abusive clients (docs/rest.md): at most ``MAX_CONNECTIONS`` connections
(as many more are answered 503, any beyond dropped), a request head within ``IDLE_SECONDS`` of the
connection or of the last answer, a body within ``IDLE_SECONDS`` and at most
``MAX_BODY_BYTES``, and malformed HTTP logged one line at a time, at most once per
``LOG_INTERVAL_SECONDS``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any, Awaitable, Callable

from aiohttp import web

from ..acquisition.controller import AcquisitionController
from ..pvs.kinds import MAX_PULSE_ID
from ..pvs.writer import WriterPVs

log = logging.getLogger(__name__)

# The predecessor's names of the states: a writer was idle ("waiting") or writing.
_STATUS_OF_STATE = {"IDLE": "waiting", "WAITING": "writing", "WRITING": "writing",
                    "CLOSING": "writing", "ERROR": "error"}
# Parameter → PV; general/created has no PV and goes to the controller.
_TEXT_PARAMETERS = {"general/user": "USER", "general/process": "PROCESS",
                    "general/instrument": "INSTRUMENT"}
_CREATED = "general/created"
_OUTPUT_FILE = "output_file"
REQUIRED_PARAMETERS = (_CREATED, *_TEXT_PARAMETERS)

# The connections share the process's file descriptors with the CA server and the files
# written: unbounded, a flood of them would starve both. A DAQ system needs a few.
MAX_CONNECTIONS = 64
# aiohttp's keep-alive timer also runs from the connection's start and closes it when no
# complete request head has arrived (its default is an hour); the same time bounds the
# body. Without it, clients that send nothing (or a byte at a time) hold connections.
IDLE_SECONDS = 10.0
# A body is four short strings and a file name (each PV holds a few hundred bytes);
# with the connection bound, this bounds what bodies can cost to a few MiB.
MAX_BODY_BYTES = 64 * 1024
# Header limits: aiohttp's 8190 bytes a line; 32 headers instead of its 128 (a client
# sends a handful), so that a head costs at most about 256 KiB.
MAX_HEADERS = 32
LOG_INTERVAL_SECONDS = 10.0


class Refused(Exception):
    """A request the API answers with ``{"state": "error", "status": <text>}``, with
    HTTP 200 as the predecessor did, or ``http_status`` where the request itself is at
    fault at the HTTP level (a body too large or too slow)."""

    def __init__(self, reason: str, http_status: int = 200) -> None:
        super().__init__(reason)
        self.http_status = http_status


class RestApi:
    """The REST API over one writer's PVs and the controller behind them (status and
    general/created)."""

    def __init__(self, writer_pvs: WriterPVs, controller: AcquisitionController) -> None:
        self._pvs = writer_pvs
        self._controller = controller
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._pending_puts: set[asyncio.Future] = set()  # stops left to complete

    def application(self) -> web.Application:
        app = web.Application(middlewares=[_error_answers], client_max_size=MAX_BODY_BYTES)
        app.add_routes([
            web.get("/status", self._status),
            web.post("/parameters", self._parameters),
            web.put("/start_pulse_id/{pulse_id}", self._start_pulse_id),
            web.put("/stop_pulse_id/{pulse_id}", self._stop_pulse_id),
            web.put("/start_now", self._start_now),
            web.put("/stop_now", self._stop_now),
            web.get("/statistics", self._statistics),
            web.get("/stop", self._stop),
            web.get("/kill", self._kill),
        ])
        return app

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` in the running loop; OSError when it cannot."""
        self._runner = web.AppRunner(self.application(), access_log=None,
                                     keepalive_timeout=IDLE_SECONDS, max_headers=MAX_HEADERS,
                                     logger=_http_log)
        await self._runner.setup()
        server = self._runner.server
        assert server is not None  # set up
        try:
            # Not a TCPSite: its protocol factory cannot be wrapped to bound connections.
            self._listener = await asyncio.get_running_loop().create_server(
                _ConnectionLimit(server, MAX_CONNECTIONS), host, port)
        except OSError:
            await self.stop()
            raise
        log.info("REST API on http://%s:%d/", host, port)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- handlers --------------------------------------------------------------------

    async def _status(self, request: web.Request) -> web.Response:
        return _ok(self._state())

    async def _parameters(self, request: web.Request) -> web.Response:
        parameters = await _json_object(request)
        _check_parameters(parameters)
        # All or nothing: every value is checked first, then OUTPUT_FILE, the one put a
        # putter can refuse for its value, goes first.
        puts = {pv_name: self._text_for(pv_name, parameters, key)
                for key, pv_name in _TEXT_PARAMETERS.items()}
        if _OUTPUT_FILE in parameters:
            puts = {"OUTPUT_FILE": self._text_for("OUTPUT_FILE", parameters, _OUTPUT_FILE),
                    **puts}
        for pv_name, text in puts.items():
            await self._put(pv_name, text)
        self._controller.set_next_created(parameters[_CREATED])
        log.info("REST parameters set: %s", parameters)
        return _ok(self._state(), parameters=parameters)

    async def _start_pulse_id(self, request: web.Request) -> web.Response:
        await self._put("START_PULSE_ID", float(_pulse_id(request)))
        return web.Response()

    async def _stop_pulse_id(self, request: web.Request) -> web.Response:
        await self._put_until_accepted("STOP_PULSE_ID", float(_pulse_id(request)))
        return web.Response()

    async def _start_now(self, request: web.Request) -> web.Response:
        body = await _json_object(request, optional=True)
        unknown = set(body) - {_OUTPUT_FILE}
        if unknown:
            raise Refused(f"unknown parameters {sorted(unknown)}: only '{_OUTPUT_FILE}'")
        if _OUTPUT_FILE in body:
            await self._put("OUTPUT_FILE", self._text_for("OUTPUT_FILE", body, _OUTPUT_FILE))
        await self._put("START_NOW", "Do")
        return web.Response()

    async def _stop_now(self, request: web.Request) -> web.Response:
        await self._put_until_accepted("STOP_NOW", "Do")
        return web.Response()

    async def _statistics(self, request: web.Request) -> web.Response:
        status = self._controller.status()
        timestamp = status.last_timestamp_ns
        return _ok(self._state(), statistics={
            "start_pulse_id": status.start_pulse_id,
            "stop_pulse_id": status.stop_pulse_id,
            "start_timestamp": status.start_time,
            "stop_timestamp": status.stop_time,
            "last_pulse_id": status.last_pulse_id,
            # Seconds, as the predecessor gave the bsread global timestamp.
            "last_timestamp": None if timestamp is None else timestamp / 1e9,
        })

    async def _stop(self, request: web.Request) -> web.Response:
        await self._put("STOP_NOW", "Do")
        return _ok(self._state())

    async def _kill(self, request: web.Request) -> web.Response:
        # The predecessor's process exited; the IOC is a service: abort the file only.
        await self._put("ABORT", "Do")
        return _ok(self._state())

    # ---- the PV layer ----------------------------------------------------------------

    def _state(self) -> str:
        return _STATUS_OF_STATE[self._pvs.STATE.value]

    def _text_for(self, pv_name: str, values: dict[str, Any], key: str) -> str:
        """``values[key]`` checked for a CHAR waveform PV. A CA put longer than the PV
        is refused by caproto; an in-process write of a str is not checked, so it is here."""
        text = _text(values, key)
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise Refused(f"'{key}' is not valid Unicode (a lone surrogate)") from None
        limit = getattr(self._pvs, pv_name).max_length
        if size > limit:
            raise Refused(f"'{key}' is {size} bytes long in UTF-8, {pv_name} holds {limit}")
        if "\0" in text:
            raise Refused(f"'{key}' contains a NUL character")
        return text

    async def _put(self, pv_name: str, value: Any) -> None:
        """A put as a CA client's: the putter's refusal becomes the answer."""
        try:
            await getattr(self._pvs, pv_name).write(value)
        except Exception as error:
            raise Refused(str(error) or type(error).__name__) from error

    async def _put_until_accepted(self, pv_name: str, value: Any) -> None:
        """Put, and answer once the controller accepted the command (or refused it);
        the put then completes when the file is closed."""
        try:
            put = await self._pvs.put_until_accepted(pv_name, value)
        except Exception as error:
            raise Refused(str(error) or type(error).__name__) from error
        self._pending_puts.add(put)
        put.add_done_callback(self._put_completed)

    def _put_completed(self, put: asyncio.Future) -> None:
        self._pending_puts.discard(put)
        if not put.cancelled() and put.exception() is not None:
            # Taken, then failed while closing the file: STATE and MESSAGE tell it.
            log.warning("REST stop ended in an error: %s", put.exception())


@web.middleware
async def _error_answers(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
    """Refusals as the predecessor answered them (HTTP 200); unknown paths and methods
    keep their HTTP status with the same JSON; a fault of the API itself is logged."""
    try:
        return await handler(request)
    except Refused as error:
        log.warning("REST %s %s refused: %s", request.method, request.path, error)
        return _error(str(error), status=error.http_status)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _error(error.reason, status=error.status)
    except Exception as error:
        log.error("REST %s %s failed", request.method, request.path, exc_info=True)
        return _error(f"internal error: {error}", status=500)


def _ok(status: str, **fields: Any) -> web.Response:
    return web.json_response({"state": "ok", "status": status, **fields})


def _error(reason: str, status: int = 200) -> web.Response:
    return web.json_response({"state": "error", "status": reason}, status=status)


async def _json_object(request: web.Request, optional: bool = False) -> dict[str, Any]:
    body = await _body(request)
    if optional and not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise Refused(f"the request body is not JSON: {error}") from None
    if not isinstance(value, dict):
        raise Refused(f"the request body must be a JSON object, not {type(value).__name__}")
    return value


async def _body(request: web.Request) -> bytes:
    """The body, refused unread when its Content-Length is over the limit (aiohttp would
    read past the limit first) and when it does not arrive in time."""
    too_large = Refused(f"the request body is over the limit of {MAX_BODY_BYTES} bytes",
                        http_status=413)
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise too_large
    try:
        async with asyncio.timeout(IDLE_SECONDS):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:  # chunked, without a Content-Length
        raise too_large from None
    except TimeoutError:
        raise Refused(f"the request body did not arrive within {IDLE_SECONDS:g} s",
                      http_status=408) from None


def _check_parameters(parameters: dict[str, Any]) -> None:
    missing = [key for key in REQUIRED_PARAMETERS if key not in parameters]
    if missing:
        raise Refused(f"Missing mandatory parameters. Mandatory parameters "
                      f"{list(REQUIRED_PARAMETERS)} but received {list(parameters)}")
    unknown = set(parameters) - {*REQUIRED_PARAMETERS, _OUTPUT_FILE}
    if unknown:
        raise Refused(f"unknown parameters {sorted(unknown)}: known are "
                      f"{[*REQUIRED_PARAMETERS, _OUTPUT_FILE]}")
    for key in parameters:
        _text(parameters, key)


def _text(values: dict[str, Any], key: str) -> str:
    value = values[key]
    if not isinstance(value, str):
        raise Refused(f"'{key}' must be a string, not {json.dumps(value)}")
    return value


_DIGITS = re.compile(r"[0-9]+")


def _pulse_id(request: web.Request) -> int:
    text = request.match_info["pulse_id"]
    # Digits only: int() would also take "+5", " 5" and "5_000".
    if not _DIGITS.fullmatch(text):
        raise Refused(f"the pulse id must be a whole number of 0 or more, not {text!r}")
    pulse_id = int(text)
    # The PVs are float64: beyond 2**53 the value put would not be the one asked for.
    if pulse_id >= MAX_PULSE_ID:
        raise Refused(f"the pulse id must be below 2**53, not {pulse_id}")
    return pulse_id


class _ConnectionLimit:
    """The server's protocol factory, with at most ``limit`` connections served: as many
    again are answered 503 and closed within ``BUSY_SECONDS``; beyond that, connections
    are dropped at once."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], limit: int) -> None:
        self._factory = factory
        # Counted here, not from the aiohttp server's connections: those are registered
        # a loop turn later, and one burst of accepts would overshoot the limit.
        self._served = _Slots(limit)
        self._refused = _Slots(limit)

    def __call__(self) -> asyncio.Protocol:
        if self._served.take():
            return _Counted(self._factory(), self._served)
        if self._refused.take():
            return _Counted(_Busy(), self._refused)
        return _Dropped()


class _Slots:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._taken = 0

    def take(self) -> bool:
        if self._taken >= self._limit:
            return False
        self._taken += 1
        return True

    def release(self) -> None:
        self._taken -= 1


class _Counted(asyncio.Protocol):
    """A connection's protocol, holding a slot until the connection ends."""

    def __init__(self, inner: asyncio.Protocol, slots: _Slots) -> None:
        self._inner = inner
        self._slots = slots

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._slots.release()
        self._inner.connection_lost(exc)


_BUSY_BODY = json.dumps({"state": "error", "status": f"too many connections (the limit "
                         f"is {MAX_CONNECTIONS}): try again later"}).encode()
_BUSY_ANSWER = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(_BUSY_BODY)
                + _BUSY_BODY)
BUSY_SECONDS = 1.0


class _Busy(asyncio.Protocol):
    """A connection over the limit: answered, then closed when the client has read the
    answer and closed its end, or after ``BUSY_SECONDS``. Closed with the client's
    request unread, the kernel would reset the connection and the client lose the
    answer."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY_ANSWER)
        transport.write_eof()
        asyncio.get_running_loop().call_later(BUSY_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request, not served


class _Dropped(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.abort()


class _OneLinePerInterval(logging.Filter):
    """aiohttp logs every malformed request with a traceback at ERROR: a flood of them
    would fill the log and busy the loop formatting. Lets one record through per
    ``interval`` seconds, as one line (the exception's message), counting the others."""

    def __init__(self, interval: float) -> None:
        super().__init__()
        self._interval = interval
        self._next = 0.0
        self._held_back = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now < self._next:
            self._held_back += 1
            return False
        self._next = now + self._interval
        error = record.exc_info[1] if record.exc_info else None
        text = f"{record.getMessage()}: {error}" if error else record.getMessage()
        record.msg = " ".join(text.split())  # aiohttp's parse errors span lines
        if self._held_back:
            record.msg += f" (and {self._held_back} more since)"
        record.args, record.exc_info, record.exc_text = None, None, None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        self._held_back = 0
        return True


_http_log = logging.getLogger(f"{__name__}.http")
_http_log.addFilter(_OneLinePerInterval(LOG_INTERVAL_SECONDS))
