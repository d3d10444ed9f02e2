"""The control protocol of gatewayd, sans-IO: newline-delimited JSON requests and responses.

A request is one line ``{"id": ID, "method": NAME, "params": {...}}`` (``params``
optional; ``id`` a string, an integer or null); its answer is one line
``{"id": ID, "result": ...}`` or ``{"id": ID, "error": {"code": CODE, "message": TEXT}}``.
Requests on one connection are answered in order.  Error codes are strings
(:class:`Code`); the message says what to do.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_LINE = 1 << 20
RequestId = str | int | None


class Code(str, enum.Enum):
    PARSE_ERROR = "parse_error"  # not JSON, or a line too long
    INVALID_REQUEST = "invalid_request"  # JSON, but not a request
    UNKNOWN_METHOD = "unknown_method"
    INVALID_PARAMS = "invalid_params"
    NOT_FOUND = "not_found"  # no such LUN or file
    CONFLICT = "conflict"  # already there
    NO_HEADER = "no_header"  # the store has no eVLU header (and plain was not asked for)
    UNUSABLE = "unusable"  # the store or its metadata cannot be used
    UNAVAILABLE = "unavailable"  # the component is not there (e.g. LIO configuration)
    FORBIDDEN = "forbidden"  # the peer may not use the socket
    INTERNAL = "internal"


class ControlError(Exception):
    """An error answer: a :class:`Code` and a message."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message}


@dataclass(frozen=True)
class Request:
    id: RequestId
    method: str
    params: dict[str, Any] = field(default_factory=dict)


class Params:
    """A request's parameters, checked by name and type; unknown names are refused."""

    def __init__(self, params: dict[str, Any], known: tuple[str, ...]) -> None:
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ControlError(Code.INVALID_PARAMS, f"unknown parameter(s) {', '.join(unknown)}; "
                               f"known: {', '.join(known) or 'none'}")
        self._params = params

    def get(self, name: str, kind: type, default: Any = None, *, required: bool = False) -> Any:
        if name not in self._params or self._params[name] is None:
            if required:
                raise ControlError(Code.INVALID_PARAMS, f"parameter {name!r} is required")
            return default
        value = self._params[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ControlError(Code.INVALID_PARAMS,
                               f"parameter {name!r} must be a {kind.__name__}, not "
                               f"{type(value).__name__}")
        return value


def parse_request(line: bytes) -> Request:
    """Decode one request line; ControlError (parse_error, invalid_request) otherwise."""
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ControlError(Code.PARSE_ERROR, f"not a JSON line: {exc}") from None
    if not isinstance(doc, dict):
        raise ControlError(Code.INVALID_REQUEST, "a request is a JSON object")
    rid = doc.get("id")
    if not (rid is None or isinstance(rid, (str, int))) or isinstance(rid, bool):
        raise ControlError(Code.INVALID_REQUEST, "'id' must be a string, an integer or null")
    method, params = doc.get("method"), doc.get("params", {})
    if not isinstance(method, str) or not method:
        raise _with_id(ControlError(Code.INVALID_REQUEST, "'method' must be a non-empty string"),
                       rid)
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise _with_id(ControlError(Code.INVALID_REQUEST, "'params' must be an object"), rid)
    unknown = sorted(set(doc) - {"id", "method", "params"})
    if unknown:
        raise _with_id(ControlError(Code.INVALID_REQUEST,
                                    f"unknown request field(s) {', '.join(unknown)}"), rid)
    return Request(rid, method, params)


def _with_id(error: ControlError, rid: RequestId) -> ControlError:
    error.request_id = rid  # type: ignore[attr-defined]
    return error


def encode_request(request: Request) -> bytes:
    return _line({"id": request.id, "method": request.method, "params": request.params})


def encode_result(rid: RequestId, result: Any) -> bytes:
    return _line({"id": rid, "result": result})


def encode_error(rid: RequestId, error: ControlError) -> bytes:
    return _line({"id": rid, "error": error.to_json()})


def _line(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode() + b"\n"


def parse_response(line: bytes) -> tuple[RequestId, Any]:
    """(id, result) of a response line; its error as a ControlError."""
    try:
        doc = json.loads(line)
        rid = doc["id"]
        if "error" in doc:
            error = doc["error"]
            raise ControlError(Code(error["code"]), str(error["message"]))
        return rid, doc["result"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ControlError(Code.PARSE_ERROR, f"malformed response from gatewayd: {exc}") from None


class LineBuffer:
    """Splits a byte stream into lines of at most ``limit`` bytes."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The complete lines ``data`` finishes; ControlError when a line is too long."""
        self._buf += data
        lines = []
        while (end := self._buf.find(b"\n")) >= 0:
            lines.append(bytes(self._buf[:end]))
            del self._buf[:end + 1]
        if len(self._buf) > self.limit or any(len(line) > self.limit for line in lines):
            self._buf.clear()
            raise ControlError(Code.PARSE_ERROR, f"request line longer than {self.limit} bytes")
        return [line for line in lines if line.strip()]


Method = Callable[[dict[str, Any]], Any]


class Dispatcher:
    """Maps method names to functions of the params; answers a line with a line."""

    def __init__(self, methods: dict[str, Method],
                 on_internal_error: Callable[[str, BaseException], None]) -> None:
        self.methods = methods
        self._on_internal_error = on_internal_error

    def answer(self, line: bytes) -> bytes:
        """The response line for one request line (never raises)."""
        rid: RequestId = None
        try:
            request = parse_request(line)
            rid = request.id
            method = self.methods.get(request.method)
            if method is None:
                raise ControlError(Code.UNKNOWN_METHOD,
                                   f"unknown method {request.method!r}; methods: "
                                   f"{', '.join(sorted(self.methods))}")
            return encode_result(rid, method(request.params))
        except ControlError as exc:
            return encode_error(getattr(exc, "request_id", rid), exc)
        except Exception as exc:  # noqa: BLE001 - a bug in one method never ends the server
            self._on_internal_error(line[:200].decode(errors="replace"), exc)
            return encode_error(rid, ControlError(Code.INTERNAL,
                                                  f"internal error: {type(exc).__name__}; "
                                                  "see the gatewayd log"))
