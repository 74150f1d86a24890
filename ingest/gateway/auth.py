"""Bearer-token authentication of the ingest gateway, over the shared key mechanism.

The mechanism itself (digests, constant-time compare, scopes, tenants) is :mod:`schemas.access`,
used by every streamlearn server. This module keeps the gateway's view of it:

* the gateway's keys are ``STREAMLEARN_KEYS`` / ``STREAMLEARN_KEYS_FILE`` (any scope) plus the legacy
  ``STREAMLEARN_INGEST_TOKENS`` (``name:token`` or ``token``; scope ``ingest`` unless the entry says
  otherwise);
* refusals are the gateway's own errors (401/403 with ``{"error": ...}``).

A request is identified by a :class:`~schemas.access.Principal` whose ``name`` is the configured
name, or ``token#<n>`` for unnamed tokens: that is what rate limits and idempotency keys are
scoped by, and what logs may show. The token itself is never kept.
"""

from __future__ import annotations

from ingest.gateway.errors import AuthenticationError, ForbiddenError
from schemas.access import KeyTable, Principal, load_keys
from schemas.exceptions import AccessError, UnauthenticatedError
from streaming.config import Settings

__all__ = ["Principal", "TokenTable", "gateway_keys"]


class TokenTable(KeyTable):
    """A :class:`KeyTable` whose refusals are gateway errors; ``spec`` is ``STREAMLEARN_INGEST_TOKENS``."""

    def __init__(self, spec: str = "", *, entries: KeyTable | None = None) -> None:
        super().__init__(spec, setting="ingest_tokens", env="STREAMLEARN_INGEST_TOKENS",
                         default_scopes=("ingest",))
        if entries is not None:
            merged = KeyTable.merged(entries, self)
            self._entries = merged._entries

    def authenticate(self, authorization: str | None, *, allow_basic: bool = False) -> Principal:
        try:
            return super().authenticate(authorization)
        except UnauthenticatedError as exc:
            raise AuthenticationError(exc.message) from None
        except AccessError as exc:
            raise ForbiddenError(exc.message) from None

    def require(self, principal: Principal, scope: str, name: str | None = None) -> None:
        try:
            super().require(principal, scope, name)
        except AccessError as exc:
            raise ForbiddenError(exc.message) from None


def gateway_keys(settings: Settings) -> TokenTable:
    """Every key the gateway accepts: the shared keys plus the legacy ingest tokens."""
    return TokenTable(settings.ingest_tokens, entries=load_keys(settings.keys, settings.keys_file))
