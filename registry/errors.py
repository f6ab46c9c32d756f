"""Domain errors of the service; the API turns each into an RFC 9457 problem with the matching status."""

from __future__ import annotations


class RegistryError(Exception):
    status = 400
    title = "Bad request"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(RegistryError):
    status = 404
    title = "Not found"


class Conflict(RegistryError):
    status = 409
    title = "Conflict"


class Unprocessable(RegistryError):
    status = 422
    title = "Unprocessable request"


class Unauthorized(RegistryError):
    status = 401
    title = "Unauthorized"


class Forbidden(RegistryError):
    status = 403
    title = "Forbidden"
