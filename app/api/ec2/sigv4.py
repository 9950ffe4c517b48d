"""AWS Signature Version 4, verified as EC2 does it (EC2.md §4.8).

The canonical request is rebuilt from what arrived -- method, path, query string, the signed
headers (``host`` with its port), and the SHA-256 of the raw body bytes -- and signed with the
secret of the access key the ``Credential`` names. Written here rather than borrowed from
botocore, whose signer is for clients: a server needs the parsing, the scope and clock checks,
and a constant-time comparison around a few lines of HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, quote

from app.api.ec2.protocol import Ec2Error

ALGORITHM = "AWS4-HMAC-SHA256"
SKEW = timedelta(minutes=15)
_FIELD = re.compile(r"(\w+)=([^,\s]+)")


@dataclass(frozen=True)
class Signed:
    access_key: str
    date: str  # yyyymmdd
    region: str
    service: str
    amz_date: str  # yyyymmddThhmmssZ
    signed_headers: list[str]
    signature: str


def auth_failure(message: str = "AWS was not able to validate the provided access credentials") -> Ec2Error:
    return Ec2Error("AuthFailure", message, 401)


def parse(headers: dict[str, str], query: dict[str, str]) -> Signed:
    """The signature's parts, from the ``Authorization`` header or a presigned query."""
    header = headers.get("authorization")
    if header is None and "X-Amz-Signature" in query:
        credential, signed, signature = (
            query.get("X-Amz-Credential", ""),
            query.get("X-Amz-SignedHeaders", ""),
            query.get("X-Amz-Signature", ""),
        )
        amz_date = query.get("X-Amz-Date", "")
        if query.get("X-Amz-Algorithm") != ALGORITHM:
            raise Ec2Error("IncompleteSignature", f"Unsupported algorithm; use {ALGORITHM}")
    elif header is None:
        raise auth_failure("The request is not signed: the Authorization header is missing")
    else:
        algorithm, _, rest = header.strip().partition(" ")
        if algorithm != ALGORITHM:
            raise Ec2Error("IncompleteSignature", f"Unsupported algorithm {algorithm!r}; use {ALGORITHM}")
        fields = dict(_FIELD.findall(rest))
        credential, signed, signature = (
            fields.get("Credential", ""),
            fields.get("SignedHeaders", ""),
            fields.get("Signature", ""),
        )
        amz_date = headers.get("x-amz-date", "")
    scope = credential.split("/")
    if len(scope) != 5 or not signed or not re.fullmatch(r"[0-9a-f]{64}", signature) or not amz_date:
        raise Ec2Error(
            "IncompleteSignature",
            "Authorization must name Credential=KEY/DATE/REGION/SERVICE/aws4_request, "
            "SignedHeaders and Signature, with X-Amz-Date",
        )
    access_key, date, region, service, terminal = scope
    if terminal != "aws4_request" or service != "ec2":
        raise Ec2Error("IncompleteSignature", "The credential scope must end in ec2/aws4_request")
    names = signed.lower().split(";")
    if "host" not in names:
        raise Ec2Error("IncompleteSignature", "The host header must be signed")
    return Signed(access_key, date, region, service, amz_date, names, signature)


def check_region(signed: Signed, region: str) -> None:
    """The request is signed for this facade's region (``NEPHOS_EC2_REGION``), as AWS requires."""
    if signed.region != region:
        raise Ec2Error(
            "AuthFailure",
            f"Credential should be scoped to a valid region, not '{signed.region[:64]}'. "
            f"This endpoint serves region '{region}'.",
            401,
        )


def check_time(signed: Signed, now: datetime | None = None) -> None:
    try:
        when = datetime.strptime(signed.amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise Ec2Error("IncompleteSignature", f"X-Amz-Date {signed.amz_date!r} is not yyyymmddThhmmssZ") from None
    if not signed.amz_date.startswith(signed.date):
        raise auth_failure("The credential scope's date is not the request's date")
    if abs((now or datetime.now(UTC)) - when) > SKEW:
        raise auth_failure("The request's date is more than 15 minutes from the server's time")


def _canonical_query(raw: str) -> str:
    pairs = [
        (quote(k, safe="-_.~"), quote(v, safe="-_.~"))
        for k, v in parse_qsl(raw, keep_blank_values=True)
        if k != "X-Amz-Signature"
    ]
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def expected(
    signed: Signed, secret: str, *, method: str, path: str, query: str, headers: dict[str, str], body: bytes
) -> str:
    canonical_headers = "".join(f"{name}:{' '.join(headers.get(name, '').split())}\n" for name in signed.signed_headers)
    canonical = "\n".join(
        [
            method,
            quote(path, safe="/-_.~"),
            _canonical_query(query),
            canonical_headers,
            ";".join(signed.signed_headers),
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{signed.date}/{signed.region}/{signed.service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, signed.amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in (signed.date, signed.region, signed.service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def verify(
    signed: Signed, secret: str, *, method: str, path: str, query: str, headers: dict[str, str], body: bytes
) -> None:
    mine = expected(signed, secret, method=method, path=path, query=query, headers=headers, body=body)
    if not hmac.compare_digest(mine, signed.signature):
        raise auth_failure("The request signature we calculated does not match the signature you provided")
