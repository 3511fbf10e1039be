"""Constant-time checks of webhook credentials over raw request bytes.

Pure functions: they take the secrets and the exact bytes received and answer
yes or no. They never log, never raise on bad input, never parse the body.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable


def token_matches(presented: str, secrets: Iterable[str]) -> bool:
    """True when `presented` equals one of `secrets` (plain shared token, e.g. X-Gitlab-Token).

    Every secret is compared, so the time taken does not tell which one matched.
    """
    given = presented.encode("utf-8", "surrogateescape")
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(given, secret.encode("utf-8"))
    return found


def hex_hmac_matches(body: bytes, signature: str, secrets: Iterable[str], *, algorithm: str = "sha256") -> bool:
    """True when hex `signature` is HMAC-<algorithm>(secret, body) for one of `secrets`."""
    given = signature.strip().lower().encode("ascii", "replace")
    found = False
    for secret in secrets:
        digest = hmac.new(secret.encode("utf-8"), body, algorithm).hexdigest().encode("ascii")
        found |= hmac.compare_digest(given, digest)
    return found


def standard_webhook_key(secret: str) -> bytes:
    """The HMAC key for a Standard Webhooks signing secret.

    A `whsec_`-prefixed secret is base64 after the prefix (the Standard Webhooks
    convention); any other secret is used as its UTF-8 bytes.
    """
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[len("whsec_"):], validate=True)
        except binascii.Error:
            pass
    return secret.encode("utf-8")


def standard_webhook_matches(
    body: bytes, *, msg_id: str, timestamp: str, signature_header: str, secrets: Iterable[str]
) -> bool:
    """True when one `v1,<base64>` entry of `signature_header` signs `id.timestamp.body`.

    This is the Standard Webhooks scheme GitLab uses for its signing token
    (headers webhook-id, webhook-timestamp, webhook-signature). The caller checks
    the timestamp's age.
    """
    signed = msg_id.encode("utf-8", "surrogateescape") + b"." + timestamp.encode("ascii", "replace") + b"." + body
    presented = []
    for entry in signature_header.split():
        version, _, value = entry.partition(",")
        if version == "v1" and value:
            presented.append(value.encode("ascii", "replace"))
    found = False
    for secret in secrets:
        expected = base64.b64encode(hmac.new(standard_webhook_key(secret), signed, hashlib.sha256).digest())
        for value in presented:
            found |= hmac.compare_digest(value, expected)
    return found
