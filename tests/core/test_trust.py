"""broker.core.trust: run signatures and people's signed requests, and the store that keeps requests."""

from __future__ import annotations

import dataclasses

import pytest

from broker.core.errors import Untrusted
from broker.adapters.redis_store import SyncStore
from broker.core.trust import PersonRequest, run_signature, run_signature_ok, sign_request, verify_request

KEY = b"k" * 32
FIELDS = dict(name="app-main-1a2b3c4d-abcdef", namespace="ci", route="app", repo="acme/app", ref="refs/heads/main",
              sha="1" * 40, delivery_id="0190abcdef0123456789abcdef")


def test_a_run_signature_verifies_only_its_own_fields() -> None:
    """Changing any signed field, or the key, breaks the signature."""
    signature = run_signature(KEY, **FIELDS)
    assert run_signature_ok(KEY, signature, **FIELDS)
    assert not run_signature_ok(b"x" * 32, signature, **FIELDS)
    for name in FIELDS:
        assert not run_signature_ok(KEY, signature, **{**FIELDS, name: FIELDS[name] + "x"}), name


@pytest.mark.parametrize("garbage", [None, 7, "", "v1:" + "0" * 64, "x" * 10_000, ["v1:"], "v1:\ud800"])
def test_garbage_signatures_are_refused_without_raising(garbage: object) -> None:
    assert not run_signature_ok(KEY, garbage, **FIELDS)


def _request(**changes: object) -> PersonRequest:
    base = PersonRequest(request_id="r1", action="deploy", namespace="ci", name="run-1", actor="alice", channel="cli",
                         reason="rollback", at="2026-12-03T12:00:00.000Z", environment="staging", attempt=2, force=True)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_a_signed_request_round_trips_through_redis(redis_url: str) -> None:
    """What the on-call surface stores is what the worker reads back, signature and all."""
    store = SyncStore(redis_url, timeout=2)
    store.put_request(sign_request(KEY, _request()), ttl=60)
    assert verify_request(KEY, store.get_request("r1"), request_id="r1") == _request()


@pytest.mark.parametrize("tamper", [
    {"force": False}, {"environment": "production"}, {"name": "other"}, {"actor": "mallory"}, {"attempt": 3},
])
def test_an_altered_request_is_untrusted(tamper: dict[str, object]) -> None:
    """Someone with Redis write access flips a field of a stored request: the signature no longer matches."""
    stored = {**sign_request(KEY, _request()), **tamper}
    with pytest.raises(Untrusted, match="not signed with the broker's key"):
        verify_request(KEY, stored, request_id="r1")


def test_a_request_signed_with_another_key_or_missing_or_renamed_is_untrusted() -> None:
    with pytest.raises(Untrusted, match="not signed"):
        verify_request(KEY, sign_request(b"y" * 32, _request()), request_id="r1")
    with pytest.raises(Untrusted, match="not in the store"):
        verify_request(KEY, None, request_id="r1")
    with pytest.raises(Untrusted, match="holds the signed request"):
        verify_request(KEY, sign_request(KEY, _request()), request_id="r2")
    with pytest.raises(Untrusted, match="unexpected fields"):
        verify_request(KEY, {**sign_request(KEY, _request()), "extra": 1}, request_id="r1")
    unsigned = sign_request(KEY, _request())
    del unsigned["signature"]
    with pytest.raises(Untrusted, match="not signed"):
        verify_request(KEY, unsigned, request_id="r1")


def test_a_run_signature_is_not_a_request_signature() -> None:
    """The purposes are separated: a MAC made for one kind of record never verifies the other."""
    stored = sign_request(KEY, _request())
    assert not run_signature_ok(KEY, stored["signature"], **FIELDS)


def test_garbage_in_the_store_reads_as_none(redis_url: str) -> None:
    import redis as redis_lib

    redis_lib.Redis.from_url(redis_url).set("cibroker:request:bad", b"{not json")
    assert SyncStore(redis_url, timeout=2).get_request("bad") is None


def test_the_signing_key_comes_from_the_environment_a_file_or_the_embedded_defaults(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Each source works; a short key and a missing one (with a routing file) are refused with the variable named."""
    from broker.core.errors import ConfigError
    from config.settings import load_settings

    state = {"CIBROKER_STATE_DIR": str(tmp_path / "state")}
    embedded = load_settings(state)
    generated = embedded.require_signing_key()
    assert len(generated) >= 32 and load_settings(state).require_signing_key() == generated  # kept, not regenerated
    assert load_settings({**state, "CIBROKER_SIGNING_KEY": "s" * 40}).require_signing_key() == b"s" * 40
    (tmp_path / "key").write_text("f" * 40 + "\n")
    assert load_settings({**state, "CIBROKER_SIGNING_KEY_FILE": str(tmp_path / "key")}).require_signing_key() == b"f" * 40
    with pytest.raises(ConfigError, match="CIBROKER_SIGNING_KEY: the signing key is shorter than 32"):
        load_settings({**state, "CIBROKER_SIGNING_KEY": "short"})
    routing = tmp_path / "routing.yaml"
    routing.write_text("hosts:\n  gl:\n    kind: gitlab\n    api_url: https://gitlab.example.com\n"
                       "    webhook_secrets: [{env: HOOK}]\n")
    settings = load_settings({**state, "HOOK": "h" * 30}, config_path=routing)
    assert settings.signing_key is None
    with pytest.raises(ConfigError, match="CIBROKER_SIGNING_KEY .or CIBROKER_SIGNING_KEY_FILE. is not set"):
        settings.require_signing_key()
    assert "s" * 40 not in repr(load_settings({**state, "CIBROKER_SIGNING_KEY": "s" * 40}))
