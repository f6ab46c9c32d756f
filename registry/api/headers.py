"""Security headers every response carries, and the policy for self-contained report pages."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Validation reports are self-contained pages (inline CSS, data: images, no scripts): rendered in an opaque origin
# with nothing else allowed, so a report can never act on the registry's own origin.
REPORT_CSP = "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_ALWAYS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
           (b"referrer-policy", b"same-origin")]


class SecurityHeaders:
    """Adds no-sniffing, no-framing and a referrer policy to every HTTP response (pages, API and downloads)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [h for h in _ALWAYS if h[0] not in present]
            await send(message)

        await self.app(scope, receive, with_headers)
