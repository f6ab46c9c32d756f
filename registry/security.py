"""API tokens: random secrets shown once, stored as sha256, with scopes.

Tokens carry 256 bits of randomness, so a plain sha256 is a sound way to store them (no password-stretching
needed) and makes lookup a single indexed query. The clear token never reaches the database or the logs.
"""

from __future__ import annotations

import hashlib
import secrets

SCOPES = ("read", "submit", "publish", "admin")
TOKEN_PREFIX = "qft_"

# A scope implies the ones listed here as well.
_IMPLIED = {"admin": set(SCOPES), "publish": {"publish", "read"}, "submit": {"submit", "read"}, "read": {"read"}}


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def display_prefix(token: str) -> str:
    return token[: len(TOKEN_PREFIX) + 6]


def effective_scopes(scopes: list[str]) -> set[str]:
    out: set[str] = set()
    for scope in scopes:
        out |= _IMPLIED.get(scope, set())
    return out


def check_scopes(scopes: list[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; valid scopes: {', '.join(SCOPES)}")
    if not scopes:
        raise ValueError(f"a token needs at least one scope: {', '.join(SCOPES)}")
    return sorted(set(scopes))
