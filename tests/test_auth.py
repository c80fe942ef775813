"""Credentials: API keys, JWTs (HS256 and RS256), roles and scopes (pure logic)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from forecast.errors import AuthError, ConfigError
from forecast.settings import load_settings
from gateway.auth import Authenticator, JwtVerifier, KeyStore

SECRET = "s3cret-for-tests-only-0123456789abcdef"


def claims(**extra: object) -> dict:
    now = time.time()
    return {"sub": "app-1", "role": "analyst", "iat": now, "exp": now + 60, **extra}


@pytest.fixture
def hs(tmp_path: Path) -> Authenticator:
    return Authenticator(KeyStore(tmp_path / "keys.db"), jwt_verifier=JwtVerifier("HS256", SECRET))


def test_hs256_token_gives_its_role_and_scopes(hs: Authenticator) -> None:
    who = hs.authenticate(jwt.encode(claims(scopes=["ETTh1.*"]), SECRET, algorithm="HS256"))
    assert (who.role, who.scopes) == ("analyst", ("ETTh1.*",))
    assert who.can("viewer") and who.can("analyst") and not who.can("operator")
    assert who.sees("ETTh1.OT") and not who.sees("ETTh2.OT")


@pytest.mark.parametrize("case", ["expired", "forged", "none", "no_exp", "bad_role", "garbage"])
def test_bad_tokens_are_refused(hs: Authenticator, case: str) -> None:
    token = {
        "expired": lambda: jwt.encode(claims(exp=time.time() - 3600), SECRET, algorithm="HS256"),
        "forged": lambda: jwt.encode(
            claims(), "another-secret-of-32-bytes-length!", algorithm="HS256"
        ),
        "none": lambda: unsigned(claims()),
        "no_exp": lambda: jwt.encode({"sub": "x", "role": "admin"}, SECRET, algorithm="HS256"),
        "bad_role": lambda: jwt.encode(claims(role="root"), SECRET, algorithm="HS256"),
        "garbage": lambda: "a.b.c",
    }[case]()
    with pytest.raises(AuthError):
        hs.authenticate(token)


def unsigned(payload: dict) -> str:
    def part(doc: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


def test_rs256_accepts_its_key_and_refuses_hs256_made_with_the_public_key(tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    auth = Authenticator(
        KeyStore(tmp_path / "keys.db"), jwt_verifier=JwtVerifier("RS256", public_pem)
    )
    assert auth.authenticate(jwt.encode(claims(), private, algorithm="RS256")).role == "analyst"
    # The classic confusion attack: HS256 signed with the public key as the secret.
    header = {"alg": "HS256", "typ": "JWT"}
    body = json.dumps(claims(role="admin")).encode()
    signing_input = (
        base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=")
        + b"."
        + base64.urlsafe_b64encode(body).rstrip(b"=")
    )

    signature = hmac.new(public_pem.encode(), signing_input, hashlib.sha256).digest()
    token = (signing_input + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()
    with pytest.raises(AuthError):
        auth.authenticate(token)


def test_jwts_are_refused_where_none_is_configured(tmp_path: Path) -> None:
    auth = Authenticator(KeyStore(tmp_path / "keys.db"))
    with pytest.raises(AuthError, match="not accepted"):
        auth.authenticate(jwt.encode(claims(), SECRET, algorithm="HS256"))


def test_keys_scopes_and_revocation(tmp_path: Path) -> None:
    keys = KeyStore(tmp_path / "keys.db")
    auth = Authenticator(keys)
    key_id, token = keys.create("viewer", "app", ["sim.*"])
    who = auth.authenticate(token)
    assert who.sees("sim.00001") and not who.sees("ETTh1.OT")
    with pytest.raises(AuthError):
        auth.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B"))
    keys.revoke(key_id)
    with pytest.raises(AuthError, match="revoked"):
        auth.authenticate(token)
    with pytest.raises(AuthError):
        auth.authenticate(None)
    assert Authenticator(keys, enabled=False).authenticate(None).role == "admin"


def test_both_jwt_keys_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORECAST_JWT_SECRET", SECRET)
    monkeypatch.setenv("FORECAST_JWT_PUBLIC_KEY", "-----BEGIN PUBLIC KEY-----")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "not both" in str(caught.value) and SECRET not in str(caught.value)


def test_rate_limiter_buckets_and_retry_after() -> None:
    from forecast.options import parse_rules
    from gateway.limits import RateLimiter

    now = [0.0]
    limiter = RateLimiter("3/minute, 5/hour", clock=lambda: now[0])
    assert [limiter.hit("a") for _ in range(3)] == [None, None, None]
    assert limiter.hit("a") == pytest.approx(20.0)  # one token refills in 60 s / 3
    assert limiter.hit("b") is None  # callers are independent
    now[0] = 20.0
    assert limiter.hit("a") is None
    now[0] = 100.0
    assert limiter.hit("a") is None
    assert limiter.hit("a") == pytest.approx(3600 / 5 * (1 - (100 * 5 / 3600)), rel=1e-3)
    with pytest.raises(ValueError, match="bad rate"):
        parse_rules("10/fortnight")
