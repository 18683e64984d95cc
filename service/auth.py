"""Bearer-token authentication: tokens file, principals, gRPC interceptor.

Clients send ``authorization: Bearer <token>`` metadata. The tokens file maps
each token to a principal (a name) and an optional admin flag::

    # tokens.yaml (YAML or JSON)
    tokens:
      - token: "a-long-random-secret"      # or token_sha256: "<hex digest>"
        principal: alice
      - token: "another-long-secret"
        principal: ops
        admin: true

A principal sees and cancels only its own jobs; an admin sees all (the
servicer enforces ownership). Tokens are compared in constant time
(``hmac.compare_digest`` over SHA-256 digests, checking every entry) and never
appear in logs or error messages.

Workers push metrics with a per-job ingest token, ``ingest_token(secret,
job_id)``: an HMAC of the job id under a secret the service generates at start,
so a leaked worker token only lets one job report for itself. They also send
the job id as ``zerotrain-job-id`` metadata, so the token is checked when the
call's headers arrive, before any request body (see :mod:`zerotrain.service.gate`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ANONYMOUS",
    "INGEST_METHOD",
    "JOB_ID_METADATA",
    "OPEN_SERVICE_PREFIXES",
    "Authenticator",
    "Principal",
    "TokenFileError",
    "bearer_token",
    "ingest_token",
    "load_tokens",
    "new_ingest_secret",
]

#: Methods callable without any token (gRPC health and reflection).
OPEN_SERVICE_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
#: The ingestion rpc: authorized in the servicer (it needs the request's job id).
INGEST_METHOD = "/zerotrain.v1.JobService/ReportMetrics"
#: Metadata key naming the job a ReportMetrics call reports for (checked at the headers).
JOB_ID_METADATA = "zerotrain-job-id"
_MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    name: str
    admin: bool = False

    def may_access(self, owner: str) -> bool:
        """Whether this principal may see or cancel a job owned by ``owner``."""
        return self.admin or self.name == owner


#: The caller when the server runs with auth disabled (loopback only).
ANONYMOUS = Principal("anonymous", admin=True)


class TokenFileError(ValueError):
    """The tokens file is unreadable or malformed (the message never holds a token)."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def load_tokens(path: str | Path) -> list[tuple[bytes, Principal]]:
    """Read a tokens file (YAML or JSON) into ``(sha256(token), principal)`` pairs.

    Raises :class:`TokenFileError` naming the entry and field that is wrong.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TokenFileError(f"tokens file {path}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        # The parser's message quotes file content (a token): report only the position.
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else getattr(exc, "lineno", "?")
        raise TokenFileError(f"tokens file {path}: not valid YAML/JSON (line {line})") from None
    entries = data.get("tokens") if isinstance(data, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise TokenFileError(f"tokens file {path}: expected a non-empty list under 'tokens'")
    return _parse_entries(entries, str(path))


def _parse_entries(entries: Iterable[Any], source: str) -> list[tuple[bytes, Principal]]:
    parsed: list[tuple[bytes, Principal]] = []
    errors: list[str] = []
    seen: set[bytes] = set()
    for i, entry in enumerate(entries):
        where = f"tokens[{i}]"
        if not isinstance(entry, Mapping):
            errors.append(f"{where}: must be a mapping with token and principal")
            continue
        unknown = sorted(set(entry) - {"token", "token_sha256", "principal", "admin"})
        if unknown:
            errors.append(f"{where}: unknown keys {unknown}")
        name, admin = entry.get("principal"), entry.get("admin", False)
        if not isinstance(name, str) or not name.strip():
            errors.append(f"{where}.principal: must be a non-empty string")
        if not isinstance(admin, bool):
            errors.append(f"{where}.admin: must be true or false")
        token, hashed = entry.get("token"), entry.get("token_sha256")
        digest = None
        if (token is None) == (hashed is None):
            errors.append(f"{where}: give exactly one of token, token_sha256")
        elif token is not None:
            if not isinstance(token, str) or len(token) < _MIN_TOKEN_CHARS:
                errors.append(
                    f"{where}.token: must be a string of >= {_MIN_TOKEN_CHARS} characters"
                )
            else:
                digest = _digest(token)
        else:
            try:
                digest = bytes.fromhex(hashed) if isinstance(hashed, str) else None
            except ValueError:
                digest = None
            if digest is None or len(digest) != 32:
                errors.append(f"{where}.token_sha256: must be 64 hex characters")
                digest = None
        if digest is not None:
            if digest in seen:
                errors.append(f"{where}: duplicate token")
            seen.add(digest)
            if isinstance(name, str) and name.strip() and isinstance(admin, bool):
                parsed.append((digest, Principal(name.strip(), admin)))
    if errors:
        raise TokenFileError(f"tokens file {source}: " + "; ".join(errors))
    return parsed


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization" or not isinstance(value, str):
            continue
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def new_ingest_secret() -> bytes:
    """A fresh random secret for deriving per-job ingest tokens."""
    return secrets.token_bytes(32)


def ingest_token(secret: bytes, job_id: str) -> str:
    """The ingest token of ``job_id``: hex HMAC-SHA256 of the job id under ``secret``."""
    return hmac.new(secret, job_id.encode("utf-8"), hashlib.sha256).hexdigest()


class Authenticator:
    """Maps bearer tokens to principals, and checks per-job ingest tokens.

    ``Authenticator(None)`` disables user authentication: every caller is
    :data:`ANONYMOUS` (an admin). Only the server's ``--insecure-no-auth`` mode
    builds it that way, and then binds to loopback.
    """

    def __init__(
        self,
        tokens: Iterable[tuple[bytes, Principal]] | None,
        *,
        ingest_secret: bytes | None = None,
    ) -> None:
        self._tokens = None if tokens is None else list(tokens)
        self.ingest_secret = ingest_secret if ingest_secret is not None else new_ingest_secret()

    @classmethod
    def from_file(cls, path: str | Path, *, ingest_secret: bytes | None = None) -> Authenticator:
        """Build from a tokens file (see the module docstring)."""
        return cls(load_tokens(path), ingest_secret=ingest_secret)

    @classmethod
    def from_tokens(cls, tokens: Mapping[str, Principal], **kwargs: Any) -> Authenticator:
        """Build from ``{token: principal}`` (tests, embedding)."""
        return cls([(_digest(t), p) for t, p in tokens.items()], **kwargs)

    def reload(self, path: str | Path) -> int:
        """Replace the tokens with those of ``path`` (token rotation without a restart).

        All or nothing: a bad file raises :class:`TokenFileError` and the old
        tokens stay. Returns the number of tokens now accepted.
        """
        if self._tokens is None:
            raise TokenFileError("authentication is disabled; there are no tokens to reload")
        tokens = load_tokens(path)
        self._tokens = tokens  # one reference swap: concurrent checks see old or new
        return len(tokens)

    def ingest_token_for(self, job_id: str) -> str:
        """The ingest token the service hands the workers of ``job_id``."""
        return ingest_token(self.ingest_secret, job_id)

    @property
    def enabled(self) -> bool:
        """False when every caller is :data:`ANONYMOUS`."""
        return self._tokens is not None

    def authenticate(self, metadata: Iterable[tuple[str, Any]] | None) -> Principal | None:
        """The principal of the call's bearer token, or None when missing or unknown."""
        if self._tokens is None:
            return ANONYMOUS
        token = bearer_token(metadata)
        if token is None:
            return None
        digest = _digest(token)
        found = None
        for known, principal in self._tokens:  # no early exit: constant time
            if hmac.compare_digest(known, digest):
                found = principal
        return found

    def ingest_allowed(self, metadata: Iterable[tuple[str, Any]] | None, job_id: str) -> bool:
        """Whether the call may report metrics for ``job_id``.

        Accepts the job's ingest token, an admin's token, or anything when
        authentication is disabled.
        """
        if self._tokens is None:
            return True
        token = bearer_token(metadata)
        if token is None:
            return False
        if hmac.compare_digest(token.encode(), ingest_token(self.ingest_secret, job_id).encode()):
            return True
        principal = self.authenticate(metadata)
        return principal is not None and principal.admin

    def ingest_caller(self, metadata: Iterable[tuple[str, Any]] | None) -> str | None:
        """Who reports metrics, judged from the call's headers alone; None: refuse.

        The job named by the ``zerotrain-job-id`` metadata when the bearer token
        is that job's ingest token; an admin's name; ``anonymous`` with
        authentication off. The servicer still checks the token against the
        request's own job id (:meth:`ingest_allowed`).
        """
        pairs = list(metadata or ())
        job_id = next((v for k, v in pairs if k.lower() == JOB_ID_METADATA), None)
        if self._tokens is None:  # each job still gets its own ingestion budget
            return f"job {job_id}" if isinstance(job_id, str) and job_id else ANONYMOUS.name
        if isinstance(job_id, str) and job_id and self.ingest_allowed(pairs, job_id):
            principal = self.authenticate(pairs)
            return principal.name if principal is not None else f"job {job_id}"
        principal = self.authenticate(pairs)
        return principal.name if principal is not None and principal.admin else None
