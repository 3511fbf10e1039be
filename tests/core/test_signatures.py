"""Webhook credentials: the upstream HMAC vectors, GitLab's token and signing token, header case.

Expected signatures are either the corpus vectors (re-checked here with `hmac`) or computed
in this file with `hmac`, never with broker code, so a wrong implementation cannot agree
with itself. Headers go through `starlette.datastructures.Headers`, as the edge passes them.
"""

from __future__ import annotations

import base64
import orjson
import hashlib
import hmac
import json
from typing import Any
from urllib.parse import urlencode

import pytest
from starlette.datastructures import Headers

from broker.core.errors import Rejected
from broker.core.sources import AuthPolicy, source_for
from tests.support import CORPUS, headers_of, payload, read_json

NOW = 1_763_800_000  # a fixed "now": nothing here depends on the wall clock
TOLERANCE = 300


def vectors(host: str) -> list[dict[str, Any]]:
    data = read_json(CORPUS / host / "_signatures.json")
    assert isinstance(data, list) and data
    return data


def vector_id(vector: dict[str, Any]) -> str:
    return f"{vector['payload']}:{vector['header']}:{'valid' if vector['valid'] else 'invalid'}"


def hex_hmac(secret: str, body: bytes, algorithm: str = "sha256") -> str:
    return hmac.new(secret.encode(), body, algorithm).hexdigest()


def authenticate(host: str, headers: dict[str, str], body: bytes, **policy: Any) -> str:
    return source_for(host).authenticate(Headers(headers=headers), body, policy=AuthPolicy(**policy), now=NOW)


def refused(host: str, headers: dict[str, str], body: bytes, **policy: Any) -> Rejected:
    with pytest.raises(Rejected) as caught:
        authenticate(host, headers, body, **policy)
    return caught.value


# --- the corpus vectors ------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["github", "gitea"])
def test_corpus_vectors_are_what_hmac_says_over_the_stored_bytes(host: str) -> None:
    """Each vector's validity is confirmed by hmac over the byte-exact corpus file (the copy is intact)."""
    for vector in vectors(host):
        algorithm = "sha1" if vector["header"] == "X-Hub-Signature" else "sha256"
        digest = hex_hmac(vector["secret"], payload(f"{host}/{vector['payload']}"), algorithm)
        assert (vector["value"].split("=")[-1] == digest) is vector["valid"], vector_id(vector)


@pytest.mark.parametrize("vector", [v for v in vectors("github") if v["header"] == "X-Hub-Signature-256"], ids=vector_id)
def test_github_sha256_vector_verifies_or_is_refused_403(vector: dict[str, Any]) -> None:
    """Valid X-Hub-Signature-256 vectors authenticate with their secret; invalid ones are 403."""
    body = payload(f"github/{vector['payload']}")
    headers = {"X-GitHub-Event": "push", vector["header"]: vector["value"]}
    if vector["valid"]:
        assert authenticate("github", headers, body, webhook_secrets=(vector["secret"],)) == "X-Hub-Signature-256"
    else:
        assert refused("github", headers, body, webhook_secrets=(vector["secret"],)).status == 403


SHA1_VECTOR = next(v for v in vectors("github") if v["header"] == "X-Hub-Signature")


def test_github_sha1_only_signature_is_refused_401_naming_sha256_by_default() -> None:
    """With allow_sha1 off, a request signed only with X-Hub-Signature (SHA-1) is 401 and says SHA-256 is required."""
    body = payload(f"github/{SHA1_VECTOR['payload']}")
    error = refused("github", {SHA1_VECTOR["header"]: SHA1_VECTOR["value"]}, body, webhook_secrets=(SHA1_VECTOR["secret"],))
    assert error.status == 401
    assert "SHA-256" in error.reason and "X-Hub-Signature-256" in error.reason


def test_github_sha1_signature_verifies_when_allowed() -> None:
    """With allow_sha1 on, the upstream SHA-1 vector authenticates as X-Hub-Signature."""
    body = payload(f"github/{SHA1_VECTOR['payload']}")
    headers = {SHA1_VECTOR["header"]: SHA1_VECTOR["value"]}
    assert authenticate("github", headers, body, webhook_secrets=(SHA1_VECTOR["secret"],), allow_sha1=True) == "X-Hub-Signature"


def test_github_wrong_sha1_signature_is_403_when_allowed() -> None:
    """allow_sha1 accepts SHA-1, not any SHA-1: a wrong one is 403."""
    body = payload(f"github/{SHA1_VECTOR['payload']}")
    headers = {"X-Hub-Signature": "sha1=" + "0" * 40}
    assert refused("github", headers, body, webhook_secrets=(SHA1_VECTOR["secret"],), allow_sha1=True).status == 403


def test_github_bad_sha256_is_not_rescued_by_a_good_sha1() -> None:
    """When X-Hub-Signature-256 is sent it is the one checked, even if a valid SHA-1 comes along."""
    body = payload(f"github/{SHA1_VECTOR['payload']}")
    headers = {"X-Hub-Signature-256": "sha256=" + "0" * 64, SHA1_VECTOR["header"]: SHA1_VECTOR["value"]}
    assert refused("github", headers, body, webhook_secrets=(SHA1_VECTOR["secret"],), allow_sha1=True).status == 403


@pytest.mark.parametrize("vector", vectors("gitea"), ids=vector_id)
def test_gitea_vector_verifies_or_is_refused_403(vector: dict[str, Any]) -> None:
    """Gitea's bare-hex X-Gitea-Signature vectors authenticate with their secret (invalid ones would be 403)."""
    body = payload(f"gitea/{vector['payload']}")
    headers = {vector["header"]: vector["value"]}
    if vector["valid"]:
        assert authenticate("gitea", headers, body, webhook_secrets=(vector["secret"],)) == "X-Gitea-Signature"
    else:
        assert refused("gitea", headers, body, webhook_secrets=(vector["secret"],)).status == 403


@pytest.mark.parametrize("vector", vectors("gitea"), ids=vector_id)
def test_gitea_vector_with_another_secret_is_403(vector: dict[str, Any]) -> None:
    """The same signed request fails with any other secret."""
    body = payload(f"gitea/{vector['payload']}")
    assert refused("gitea", {vector["header"]: vector["value"]}, body, webhook_secrets=("another-secret",)).status == 403


# --- GitHub details -------------------------------------------------------------------------------

GITHUB_SIGNED = "github/push-branch-update-signed.json"


def test_github_corpus_headers_authenticate_with_upstream_spelling() -> None:
    """The corpus headers, as upstream spells them (X-Hub-Signature-256), verify through Starlette's Headers."""
    assert authenticate("github", headers_of(GITHUB_SIGNED), payload(GITHUB_SIGNED), webhook_secrets=("topsecret",)) == "X-Hub-Signature-256"


def test_github_missing_signature_is_401() -> None:
    """No signature header at all is 401."""
    assert refused("github", {"X-GitHub-Event": "push"}, payload(GITHUB_SIGNED), webhook_secrets=("topsecret",)).status == 401


def test_github_signature_without_sha256_prefix_is_403() -> None:
    """X-Hub-Signature-256 must be `sha256=<hex>`: a bare or sha1= value is 403."""
    body = payload(GITHUB_SIGNED)
    digest = hex_hmac("topsecret", body)
    assert refused("github", {"X-Hub-Signature-256": digest}, body, webhook_secrets=("topsecret",)).status == 403
    assert refused("github", {"X-Hub-Signature-256": "sha1=" + digest}, body, webhook_secrets=("topsecret",)).status == 403


def test_github_signature_is_over_the_exact_bytes() -> None:
    """Re-serialising the same JSON (same meaning, other bytes) breaks the signature: 403."""
    reformatted = json.dumps(json.loads(payload(GITHUB_SIGNED))).encode()
    headers = headers_of(GITHUB_SIGNED)
    assert refused("github", headers, reformatted, webhook_secrets=("topsecret",)).status == 403


def test_github_form_encoded_body_is_verified_over_the_form_bytes() -> None:
    """A form-encoded delivery is signed over the form bytes as received, and then parses."""
    form = urlencode({"payload": payload(GITHUB_SIGNED).decode()}).encode()
    headers = {"X-GitHub-Event": "push", "Content-Type": "application/x-www-form-urlencoded",
               "X-Hub-Signature-256": "sha256=" + hex_hmac("topsecret", form)}
    assert authenticate("github", headers, form, webhook_secrets=("topsecret",)) == "X-Hub-Signature-256"
    assert source_for("github").parse(Headers(headers=headers), form, host_id="github", loads=orjson.loads).sha == "199eddf46df50de8d02e99bf1c5fdb4101338224"  # type: ignore[union-attr]


def test_github_any_of_two_secrets_verifies() -> None:
    """During rotation either configured secret verifies."""
    assert authenticate("github", headers_of(GITHUB_SIGNED), payload(GITHUB_SIGNED), webhook_secrets=("new-secret", "topsecret")) == "X-Hub-Signature-256"


# --- Gitea / Forgejo details ------------------------------------------------------------------------

GITEA_SIGNED = "gitea/push-initial-signed.json"
GITEA_SECRET = "IsWishesWereHorsesWedAllBeEatingSteak!"


def test_forgejo_signature_is_accepted() -> None:
    """X-Forgejo-Signature (bare hex HMAC-SHA256) authenticates a Forgejo delivery."""
    body = payload(GITEA_SIGNED)
    headers = {"X-Forgejo-Event": "push", "X-Forgejo-Signature": hex_hmac(GITEA_SECRET, body)}
    assert authenticate("gitea", headers, body, webhook_secrets=(GITEA_SECRET,)) == "X-Forgejo-Signature"


def test_bad_forgejo_signature_is_not_rescued_by_a_good_gitea_one() -> None:
    """When X-Forgejo-Signature is present it is the one checked: a bad one is 403 even beside a valid X-Gitea-Signature."""
    body = payload(GITEA_SIGNED)
    headers = {**headers_of(GITEA_SIGNED), "X-Forgejo-Signature": "0" * 64}
    assert authenticate("gitea", headers_of(GITEA_SIGNED), body, webhook_secrets=(GITEA_SECRET,)) == "X-Gitea-Signature"
    assert refused("gitea", headers, body, webhook_secrets=(GITEA_SECRET,)).status == 403


def test_good_forgejo_signature_beside_a_bad_gitea_one_is_accepted() -> None:
    """Forgejo's signature decides: a stale X-Gitea-Signature next to a valid X-Forgejo-Signature is fine."""
    body = payload(GITEA_SIGNED)
    headers = {"X-Gitea-Signature": "0" * 64, "X-Forgejo-Signature": hex_hmac(GITEA_SECRET, body)}
    assert authenticate("gitea", headers, body, webhook_secrets=(GITEA_SECRET,)) == "X-Forgejo-Signature"


def test_gitea_missing_signature_is_401() -> None:
    """Neither X-Gitea-Signature nor X-Forgejo-Signature is 401."""
    assert refused("gitea", {"X-Gitea-Event": "push"}, payload(GITEA_SIGNED), webhook_secrets=(GITEA_SECRET,)).status == 401


LEGACY = "gitea/create-tag-with-secret-in-body.json"


def test_gitea_legacy_secret_in_the_body_never_authenticates() -> None:
    """The old `secret` field inside the JSON body is no credential: without a signature it is 401, as a signature 403."""
    body = payload(LEGACY)
    secret = json.loads(body)["secret"]
    assert secret
    assert refused("gitea", headers_of(LEGACY), body, webhook_secrets=(secret,)).status == 401
    assert refused("gitea", {**headers_of(LEGACY), "X-Gitea-Signature": secret}, body, webhook_secrets=(secret,)).status == 403


# --- GitLab X-Gitlab-Token --------------------------------------------------------------------------

GITLAB_PUSH = "gitlab/push-branch-update.json"
TEKTON = "gitlab/push-tekton-triggers-example.json"


def test_gitlab_token_matches() -> None:
    """The corpus X-Gitlab-Token ("topsecret") authenticates against that secret."""
    assert authenticate("gitlab", headers_of(GITLAB_PUSH), payload(GITLAB_PUSH), webhook_secrets=("topsecret",)) == "X-Gitlab-Token"


def test_gitlab_missing_token_is_401() -> None:
    """No X-Gitlab-Token is 401."""
    assert refused("gitlab", {"X-Gitlab-Event": "Push Hook"}, payload(GITLAB_PUSH), webhook_secrets=("topsecret",)).status == 401


@pytest.mark.parametrize("token", ["wrong", "", "topsecret ", "TOPSECRET", "topsecre"])
def test_gitlab_wrong_token_is_403(token: str) -> None:
    """Any token other than a configured secret, byte for byte, is 403."""
    headers = {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": token}
    assert refused("gitlab", headers, payload(GITLAB_PUSH), webhook_secrets=("topsecret",)).status == 403


@pytest.mark.parametrize("token", ["topsecret", "1234567"])
def test_gitlab_either_of_two_secrets_authenticates(token: str) -> None:
    """During rotation both the current and the previous secret are accepted."""
    headers = {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": token}
    assert authenticate("gitlab", headers, payload(GITLAB_PUSH), webhook_secrets=("topsecret", "1234567")) == "X-Gitlab-Token"


def test_gitlab_secret_of_another_host_does_not_authenticate() -> None:
    """A token valid for one host is 403 on a host configured with other secrets."""
    headers = {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "secret-of-gitlab-b"}
    assert authenticate("gitlab", headers, payload(GITLAB_PUSH), webhook_secrets=("secret-of-gitlab-b",)) == "X-Gitlab-Token"
    assert refused("gitlab", headers, payload(GITLAB_PUSH), webhook_secrets=("topsecret", "1234567")).status == 403


def test_mixed_case_header_names_work_through_starlette_headers() -> None:
    """Tekton's curl sends "X-GitLab-Token"; through a case-insensitive mapping it authenticates and parses."""
    upstream = headers_of(TEKTON)
    assert "X-GitLab-Token" in upstream
    headers = Headers(headers=upstream)
    source = source_for("gitlab")
    assert source.authenticate(headers, payload(TEKTON), policy=AuthPolicy(webhook_secrets=("1234567",)), now=NOW) == "X-Gitlab-Token"
    assert source.parse(headers, payload(TEKTON), host_id="gitlab", loads=orjson.loads).repo == "dibyom/triggers"  # type: ignore[union-attr]


@pytest.mark.parametrize("spelling", ["x-gitlab-token", "X-GITLAB-TOKEN", "X-Gitlab-Token", "x-GitLab-tOKEN"])
def test_gitlab_token_header_name_case_does_not_matter(spelling: str) -> None:
    """Header names are case-insensitive (RFC 9110): every spelling of X-Gitlab-Token is found."""
    assert authenticate("gitlab", {spelling: "topsecret"}, payload(GITLAB_PUSH), webhook_secrets=("topsecret",)) == "X-Gitlab-Token"


def test_gitlab_host_with_no_credentials_refuses_everything() -> None:
    """An empty policy never authenticates (fail closed): 403."""
    assert refused("gitlab", headers_of(GITLAB_PUSH), payload(GITLAB_PUSH)).status == 403


@pytest.mark.parametrize("host", ["github", "gitea"])
def test_hmac_host_with_no_secret_refuses_everything(host: str) -> None:
    """GitHub/Gitea with no secret configured refuse even a well-formed signature: 403."""
    body = payload(GITHUB_SIGNED if host == "github" else GITEA_SIGNED)
    headers = headers_of(GITHUB_SIGNED if host == "github" else GITEA_SIGNED)
    assert refused(host, headers, body).status == 403


# --- GitLab signing token (Standard Webhooks) -----------------------------------------------------------

SIGNING = "whsec_" + base64.b64encode(b"signing-key-for-the-tests-0123456").decode()
RAW_SIGNING = "a plain signing secret"


def standard_signature(secret: str, msg_id: str, timestamp: int | str, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}." + body)>`, key per the Standard Webhooks convention."""
    key = base64.b64decode(secret.removeprefix("whsec_")) if secret.startswith("whsec_") else secret.encode("utf-8")
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(body: bytes, *, secret: str = SIGNING, msg_id: str = "msg_2Lp0", timestamp: int = NOW, signature: str | None = None) -> dict[str, str]:
    return {
        "X-Gitlab-Event": "Push Hook",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature if signature is not None else standard_signature(secret, msg_id, timestamp, body),
    }


def signing(headers: dict[str, str], body: bytes, *secrets: str) -> str:
    return authenticate("gitlab", headers, body, signing_secrets=secrets or (SIGNING,), tolerance_seconds=TOLERANCE)


def signing_refused(headers: dict[str, str], body: bytes, *secrets: str) -> Rejected:
    with pytest.raises(Rejected) as caught:
        signing(headers, body, *secrets)
    return caught.value


def test_signing_token_valid_signature_authenticates() -> None:
    """A Standard Webhooks signature made with the whsec_ key authenticates as webhook-signature."""
    body = payload(GITLAB_PUSH)
    assert signing(signed_headers(body), body) == "webhook-signature"


def test_signing_token_without_whsec_prefix_uses_the_raw_utf8_secret() -> None:
    """A secret without the whsec_ prefix is the HMAC key as its UTF-8 bytes."""
    body = payload(GITLAB_PUSH)
    assert signing(signed_headers(body, secret=RAW_SIGNING), body, RAW_SIGNING) == "webhook-signature"


def test_signing_token_tampered_body_is_403() -> None:
    """One changed byte in the body breaks the signature: 403."""
    body = payload(GITLAB_PUSH)
    headers = signed_headers(body)
    assert signing_refused(headers, body.replace(b"master", b"mister", 1)).status == 403


def test_signing_token_wrong_secret_is_403() -> None:
    """A signature made with another secret is 403."""
    body = payload(GITLAB_PUSH)
    other = "whsec_" + base64.b64encode(b"someone else's key").decode()
    assert signing_refused(signed_headers(body, secret=other), body).status == 403


def test_signing_token_signature_binds_the_message_id() -> None:
    """The id is signed: replaying a signature under another webhook-id is 403."""
    body = payload(GITLAB_PUSH)
    headers = {**signed_headers(body, msg_id="msg_1"), "webhook-id": "msg_2"}
    assert signing_refused(headers, body).status == 403


@pytest.mark.parametrize("offset", [-(TOLERANCE + 1), -(TOLERANCE + 3600), TOLERANCE + 1, TOLERANCE + 3600])
def test_signing_token_timestamp_beyond_tolerance_is_403(offset: int) -> None:
    """A correctly signed request stamped more than the tolerance in the past (stale) or future is 403."""
    body = payload(GITLAB_PUSH)
    error = signing_refused(signed_headers(body, timestamp=NOW + offset), body)
    assert error.status == 403 and "webhook-timestamp" in error.reason


@pytest.mark.parametrize("offset", [-TOLERANCE, 0, TOLERANCE])
def test_signing_token_timestamp_within_tolerance_is_accepted(offset: int) -> None:
    """Up to the tolerance either side of now, a signed request is accepted."""
    body = payload(GITLAB_PUSH)
    assert signing(signed_headers(body, timestamp=NOW + offset), body) == "webhook-signature"


@pytest.mark.parametrize("missing", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_signing_token_missing_header_is_401(missing: str) -> None:
    """Each of webhook-id, webhook-timestamp and webhook-signature is required: without one, 401."""
    body = payload(GITLAB_PUSH)
    headers = {k: v for k, v in signed_headers(body).items() if k != missing}
    error = signing_refused(headers, body)
    assert error.status == 401 and missing in error.reason


@pytest.mark.parametrize("stamp", ["soon", "1.7e9", "-1", " 1763800000", "\u00b2", "17638\u00b900000", "9" * 5000])
def test_signing_token_timestamp_that_is_not_unix_seconds_is_401(stamp: str) -> None:
    """A webhook-timestamp that is not plain ASCII digits of sane length is 401 (never a crash)."""
    body = payload(GITLAB_PUSH)
    headers = {**signed_headers(body), "webhook-timestamp": stamp}
    assert signing_refused(headers, body).status == 401


def test_signing_token_one_valid_among_several_signatures_authenticates() -> None:
    """webhook-signature may list several space-separated signatures; one valid v1 entry is enough."""
    body = payload(GITLAB_PUSH)
    good = standard_signature(SIGNING, "msg_2Lp0", NOW, body)
    other = standard_signature("whsec_" + base64.b64encode(b"old key").decode(), "msg_2Lp0", NOW, body)
    header = f"{other} v1,{base64.b64encode(b'garbage').decode()} {good}"
    assert signing(signed_headers(body, signature=header), body) == "webhook-signature"


def test_signing_token_signatures_under_another_version_are_not_accepted() -> None:
    """Only v1 entries count: the right HMAC labelled v1a or v2 is 403."""
    body = payload(GITLAB_PUSH)
    mac = standard_signature(SIGNING, "msg_2Lp0", NOW, body).removeprefix("v1,")
    assert signing_refused(signed_headers(body, signature=f"v1a,{mac} v2,{mac}"), body).status == 403


def test_signing_token_either_of_two_signing_secrets_authenticates() -> None:
    """Signing-token rotation: a request signed with the previous secret still authenticates."""
    body = payload(GITLAB_PUSH)
    assert signing(signed_headers(body, secret=RAW_SIGNING), body, SIGNING, RAW_SIGNING) == "webhook-signature"


def test_signing_token_and_webhook_token_are_both_required_when_both_configured() -> None:
    """A host with both a signing token and a webhook secret needs both; either alone is refused."""
    body = payload(GITLAB_PUSH)
    both = {**signed_headers(body), "X-Gitlab-Token": "topsecret"}
    policy = {"signing_secrets": (SIGNING,), "webhook_secrets": ("topsecret",), "tolerance_seconds": TOLERANCE}
    assert authenticate("gitlab", both, body, **policy) == "webhook-signature + X-Gitlab-Token"
    assert refused("gitlab", signed_headers(body), body, **policy).status == 401
    assert refused("gitlab", {"X-Gitlab-Token": "topsecret"}, body, **policy).status == 401


def test_auth_policy_repr_never_shows_secrets() -> None:
    """AuthPolicy's repr counts secrets but never prints them."""
    text = repr(AuthPolicy(webhook_secrets=("topsecret",), signing_secrets=(SIGNING,)))
    assert "topsecret" not in text and SIGNING not in text and "redacted" in text
