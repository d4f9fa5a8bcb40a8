"""Optional API keys for ``/session`` (and ``/metrics`` when asked), checked at the handshake.

A key is taken from ``Authorization: Bearer KEY`` (or ``Token KEY``, as Deepgram
clients send it), the ``xi-api-key`` header (ElevenLabs clients) or, for browsers
that cannot set headers on a WebSocket, the ``api_key`` (or ElevenLabs' ``token``) query parameter. Keys are
compared in constant time and never logged.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl


class ApiKeyError(Exception):
    """The key file cannot be read or holds no key."""


@dataclass(frozen=True)
class ApiKeys:
    keys: tuple[bytes, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    @classmethod
    def load(cls, listed: str = "", file: str | Path | None = None) -> ApiKeys:
        """Keys from a comma-separated list and/or a file (one per line; blank lines and ``#`` comments skipped)."""
        keys = [k.strip() for k in listed.split(",") if k.strip()]
        if file:
            try:
                lines = Path(file).read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ApiKeyError(f"cannot read API key file {file}: {exc.strerror}") from None
            found = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
            if not found:
                raise ApiKeyError(f"API key file {file} holds no key")
            keys += found
        return cls(tuple(k.encode() for k in keys))

    def allows(self, headers, query: str) -> bool:
        """Whether the request carries a valid key (always true when no keys are configured)."""
        if not self.keys:
            return True
        params = dict(parse_qsl(query))
        offered = (_bearer(headers.get("Authorization", "")) or headers.get("xi-api-key", "")
                   or params.get("api_key") or params.get("token", ""))
        if not offered:
            return False
        candidate = offered.encode()
        # Compare against every key, without stopping early, so timing says nothing about which matched.
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(candidate, key)
        return matched


def _bearer(value: str) -> str:
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() in ("bearer", "token") else ""
