"""Credentials: API keys (stored hashed in SQLite, shown once) or JWTs; roles and scopes.

A key reads ``fk_<id>_<secret>``; only SHA-256 of the secret is stored (keys are random
and long, so a slow password hash would add nothing) and compared in constant time.

The database file is created 0600 before SQLite opens it (SQLite gives its journal and
WAL files the database's mode), and an existing one is set back to 0600.

A JWT is verified with the one configured algorithm (HS256 with a secret of at least 32
bytes, or RS256 with a public key of at least 2048 bits), so ``alg: none`` and any other
algorithm are refused; ``exp``, ``iat`` and ``sub`` are required, ``exp - iat`` may not
exceed the maximum lifetime, and ``iss``/``aud`` must match when they are configured.
Claims: ``sub``, ``role`` (viewer, analyst, operator, admin) and optional ``scopes``
(sensor patterns; absent means all, ``[]`` means none).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

import jwt

from forecast.errors import AuthError
from forecast.files import private_file

log = logging.getLogger(__name__)

ROLES = ("viewer", "analyst", "operator", "admin")
MAX_SCOPE = 200


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a key (or the local process) with a role and sensor scope."""

    key_id: str
    role: str
    scopes: tuple[str, ...] = ("*",)

    def can(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    def sees(self, sensor_id: str) -> bool:
        return any(fnmatchcase(sensor_id, scope) for scope in self.scopes)


ANONYMOUS = Principal("anonymous", "admin")


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    name: str
    role: str
    scopes: tuple[str, ...]
    created_at: float
    revoked_at: float | None


class KeyStore:
    """API keys in ``<data_dir>/keys.db``; safe to use from several processes."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        private_file(path)
        for suffix in ("-journal", "-wal", "-shm"):  # left by an older version, if any
            with contextlib.suppress(FileNotFoundError, PermissionError):
                os.chmod(path.with_name(path.name + suffix), 0o600)
        with self._connect() as db:
            db.execute(
                """CREATE TABLE IF NOT EXISTS api_keys (
                    key_id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL,
                    scopes TEXT NOT NULL, secret_sha256 TEXT NOT NULL,
                    created_at REAL NOT NULL, revoked_at REAL)"""
            )

    @classmethod
    def of(cls, data_dir: Path) -> KeyStore:
        """The key store of a data directory."""
        return cls(data_dir / "keys.db")

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=5.0)

    def create(self, role: str, name: str = "", scopes: Iterable[str] = ("*",)) -> tuple[str, str]:
        """Create a key; return (key_id, token). The token is not stored and not shown again."""
        if role not in ROLES:
            raise AuthError(f"unknown role {role!r}; one of {', '.join(ROLES)}", code="bad_request")
        scopes = check_scopes(scopes)
        key_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(24)
        with self._connect() as db:
            db.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (key_id, name, role, ",".join(scopes), _sha256(secret), time.time()),
            )
        return key_id, f"fk_{key_id}_{secret}"

    def list(self) -> list[KeyInfo]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT key_id, name, role, scopes, created_at, revoked_at FROM api_keys "
                "ORDER BY created_at"
            ).fetchall()
        return [KeyInfo(r[0], r[1], r[2], tuple(r[3].split(",")), r[4], r[5]) for r in rows]

    def revoke(self, key_id: str) -> bool:
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (time.time(), key_id),
            )
        return cursor.rowcount == 1

    def authenticate(self, token: str) -> Principal:
        parts = token.split("_", 2)
        if len(parts) != 3 or parts[0] != "fk":
            raise AuthError("malformed API key")
        _, key_id, secret = parts
        with self._connect() as db:
            row = db.execute(
                "SELECT role, scopes, secret_sha256, revoked_at FROM api_keys WHERE key_id = ?",
                (key_id,),
            ).fetchone()
        if row is None or not hmac.compare_digest(row[2], _sha256(secret)):
            raise AuthError("unknown API key")
        if row[3] is not None:
            raise AuthError("revoked API key")
        return Principal(key_id, row[0], tuple(row[1].split(",")))


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Sensor patterns for a key: at least one, each non-empty, short, without a comma."""
    scopes = tuple(scopes)
    if not scopes:
        raise AuthError("a key needs at least one sensor pattern ('*' for all)", code="bad_scope")
    for scope in scopes:
        if not isinstance(scope, str) or not 0 < len(scope) <= MAX_SCOPE:
            raise AuthError(f"a scope is a pattern of 1..{MAX_SCOPE} characters", code="bad_scope")
        if "," in scope or not scope.isprintable():
            raise AuthError(
                f"scope {scope!r} contains a comma or a control character; give each "
                "pattern on its own (repeat --scope, or one list element each)",
                code="bad_scope",
            )
    return scopes


class JwtVerifier:
    """Verifies bearer JWTs with exactly one algorithm and key.

    ``iat`` is required and ``exp - iat`` may be at most ``max_ttl`` seconds; ``issuer``
    and ``audience``, when given, must match the ``iss`` and ``aud`` claims.
    """

    def __init__(
        self,
        algorithm: str,
        key: str,
        leeway: float = 30.0,
        *,
        max_ttl: float = 86_400.0,
        issuer: str | None = None,
        audience: str | None = None,
    ) -> None:
        if algorithm not in ("HS256", "RS256"):
            raise AuthError(f"unsupported JWT algorithm {algorithm!r}", code="bad_config")
        try:
            signer = jwt.get_algorithm_by_name(algorithm)
            weak = signer.check_key_length(signer.prepare_key(key))
        except (jwt.InvalidKeyError, ValueError, TypeError):
            raise AuthError(f"the {algorithm} key is not a valid key", code="bad_config") from None
        if weak:  # HS256 under 32 bytes, RS256 under 2048 bits
            raise AuthError(f"the {algorithm} key is too short: {weak}", code="bad_config")
        self.algorithm = algorithm
        self.key = key
        self.leeway = leeway
        self.max_ttl = max_ttl
        self.issuer = issuer
        self.audience = audience

    def verify(self, token: str) -> Principal:
        required = ["exp", "iat", "sub"]
        required += ["iss"] if self.issuer else []
        required += ["aud"] if self.audience else []
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=[self.algorithm],
                leeway=self.leeway,
                issuer=self.issuer,
                audience=self.audience,
                options={"require": required, "enforce_minimum_key_length": True},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        try:
            lifetime = float(claims["exp"]) - float(claims["iat"])
        except (TypeError, ValueError):
            raise AuthError("invalid token: exp and iat must be numbers") from None
        if not lifetime <= self.max_ttl:
            raise AuthError(f"invalid token: lives longer than {self.max_ttl:g} s (exp - iat)")
        role = claims.get("role", "viewer")
        scopes = claims.get("scopes", ["*"])
        if (
            role not in ROLES
            or not isinstance(scopes, list)
            or not all(isinstance(p, str) for p in scopes)
        ):
            raise AuthError("invalid token: bad role or scopes claim")
        return Principal(f"jwt:{claims['sub']}", role, tuple(scopes))  # [] sees no sensor


class Authenticator:
    """Turns a bearer token into a Principal; ``enabled=False`` lets everyone in as admin."""

    def __init__(
        self, keys: KeyStore, *, enabled: bool = True, jwt_verifier: JwtVerifier | None = None
    ) -> None:
        self.keys = keys
        self.enabled = enabled
        self.jwt = jwt_verifier
        self._process_tokens: dict[str, Principal] = {}

    def issue_process_token(self, role: str) -> str:
        """A token valid while this process runs (for the local CLI and the dashboard)."""
        token = "fp_" + secrets.token_urlsafe(24)
        self._process_tokens[token] = Principal(f"process-{role}", role)
        return token

    def authenticate(self, token: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if not token:
            raise AuthError("credentials required: Authorization: Bearer <key> or ?token=")
        for known, principal in self._process_tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                return principal
        if token.count(".") == 2:
            if self.jwt is None:
                raise AuthError("JWTs are not accepted here (no FORECAST_JWT_* configured)")
            return self.jwt.verify(token)
        return self.keys.authenticate(token)


def bearer(authorization: str | None, query_token: str | None) -> str | None:
    """The token from an ``Authorization: Bearer`` header, else from ``?token=``."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return query_token or None


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
