"""Problem details for errors the HTTP server answers before the app sees a request (malformed framing, such as
``Content-Length: abc`` or bad chunk sizes, or headers h11 cannot parse): uvicorn writes those as ``text/plain``.

Use it as the server's HTTP protocol: ``qfilters serve`` does, and in production
``uvicorn registry.main:app --http registry.api.wire:ProblemH11Protocol``.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.h11_impl import H11Protocol

from registry.api.problems import PROBLEM_JSON

_DETAIL = ("the request is not valid HTTP/1.1 (malformed request line, headers, Content-Length or chunked framing); "
           "the connection is closed")


def bad_request_bytes() -> bytes:
    """A complete ``400`` problem+json response, for a connection the server is about to close."""
    body = json.dumps({"type": "about:blank", "title": "Bad request", "status": 400, "detail": _DETAIL}).encode()
    head = (f"HTTP/1.1 400 Bad Request\r\ncontent-type: {PROBLEM_JSON}\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode("ascii")
    return head + body


class ProblemH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, answering unparseable requests with problem+json instead of ``text/plain``."""

    def send_400_response(self, msg: str) -> None:  # called by uvicorn on h11.RemoteProtocolError
        self.transport.write(bad_request_bytes())
        self.transport.close()
