"""The EC2 facade under random Actions and parameters: never a 5xx, never a traceback.

Requests are generated from botocore's own EC2 model (every one of its operations, with the
ones the facade serves drawn more often), filled with random values of each member's type --
and, often, with values of the wrong shape: garbage ids, unicode, huge and negative numbers,
wildcards, missing required members, unknown keys. botocore's EC2 serializer flattens them
exactly as boto3 would; botocore's SigV4 signer signs them, so each one gets past the
signature check and into the action. Every reply must be well-formed EC2 XML with a status
under 500 (the project's quota is small, so ``InsufficientInstanceCapacity`` cannot come
first), and nothing may be logged as an unexpected error. The seed is fixed: a failure
reproduces, and its request is in the assertion message.
"""

from __future__ import annotations

import logging
import random
import string
from typing import Any
from urllib.parse import urlencode
from xml.etree import ElementTree

import botocore.session
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.model import OperationModel, Shape
from botocore.serialize import EC2Serializer

from app.api.ec2.router import ACTIONS
from tests.conftest import Cloud

pytestmark = pytest.mark.slow

REQUESTS = 1500
MODEL = botocore.session.get_session().get_service_model("ec2")
SERIALIZER = EC2Serializer()


class Generator:
    def __init__(self, rng: random.Random, known: list[str]) -> None:
        self.rng, self.known = rng, known

    def text(self) -> str:
        r = self.rng
        return r.choice(
            [
                lambda: r.choice(self.known),
                lambda: (
                    r.choice(["i-", "ami-", "sg-", "key-", "r-", "sgr-"])
                    + "".join(r.choice("0123456789abcdef") for _ in range(r.choice([8, 17, 3])))
                ),
                lambda: "".join(r.choice(string.printable) for _ in range(r.randint(0, 40))),
                lambda: "".join(chr(r.randint(0x80, 0x2FFF)) for _ in range(r.randint(1, 10))),
                lambda: r.choice(
                    [
                        "",
                        "*",
                        "?",
                        "%",
                        "_",
                        "\\",
                        "'",
                        '"',
                        "true",
                        "false",
                        "-1",
                        "0",
                        "1e9",
                        "tiny",
                        "small",
                        "running",
                        "stopped",
                        "tcp",
                        "0.0.0.0/0",
                        "300.1.1.1/99",
                        "x" * 5000,
                        "i-*",
                        "tag:Name",
                        "instance-state-name",
                    ]
                ),
            ]
        )()

    def value(self, shape: Shape, depth: int = 0) -> Any:
        r = self.rng
        if depth and r.random() < 0.08:  # the wrong type on purpose
            return self.text()
        kind = shape.type_name
        if kind == "structure":
            members = list(shape.members.items())
            chosen = [m for m in members if m[0] in shape.required_members or r.random() < 0.3] if depth < 3 else []
            return {name: self.value(member, depth + 1) for name, member in chosen}
        if kind == "list":
            return [self.value(shape.member, depth + 1) for _ in range(r.randint(0, 3))]  # type: ignore[attr-defined]
        if kind in ("integer", "long"):
            return r.choice([-1, 0, 1, 2, 5, 999, 1000, 1001, 2**31, 2**63, r.randint(-10, 10)])
        if kind in ("double", "float"):
            return r.choice([0.0, -1.5, 1e300])
        if kind == "boolean":
            return r.random() < 0.5
        if kind == "timestamp":
            return r.choice(["2026-01-01T00:00:00Z", 0])
        if kind == "blob":
            return self.text().encode("utf-8", "replace")
        if getattr(shape, "enum", None) and r.random() < 0.7:
            return r.choice(shape.enum)  # type: ignore[attr-defined]
        return self.text()

    def request(self) -> dict[str, str]:
        r = self.rng
        names = sorted(ACTIONS) if r.random() < 0.75 else MODEL.operation_names
        op: OperationModel = MODEL.operation_model(r.choice(names))
        params = self.value(op.input_shape) if op.input_shape is not None else {}
        if r.random() < 0.3:
            params.pop(r.choice(list(params) or ["-"]), None)
        try:
            body = SERIALIZER.serialize_to_request(params, op)["body"]
        except Exception:  # a value botocore will not flatten: send the raw keys instead
            body = {
                "Action": op.name,
                "Version": "2016-11-15",
                **{k: v if isinstance(v, str) else repr(v) for k, v in params.items()},
            }
        body = {str(k): str(v) for k, v in body.items()}
        if r.random() < 0.1:
            body[self.text()[:30] or "x"] = self.text()
        if r.random() < 0.05:
            body["Action"] = self.text()[:40]
        return body


async def test_random_actions_and_parameters_never_5xx(cloud: Cloud, caplog: pytest.LogCaptureFixture) -> None:
    headers = await cloud.user(vm=3, cpu=6, ram=12288)
    r = await cloud.client.post("/api/v1/credentials/ec2", headers=headers)
    assert r.status_code == 201, r.text
    credentials = Credentials(r.json()["access_key"], r.json()["secret_key"])

    async def send(form: dict[str, str]) -> Any:
        body = urlencode(form)
        request = AWSRequest(
            method="POST",
            url="http://nephos.test/ec2/",
            data=body,
            headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
        )
        SigV4Auth(credentials, "ec2", "us-east-1").add_auth(request)
        return await cloud.client.post("/ec2/", content=body, headers=dict(request.headers.items()))

    # Real ids for the generator to use: an image, an instance, a key pair, a group.
    images = await send({"Action": "DescribeImages", "Version": "2016-11-15"})
    known = [e.text or "" for e in ElementTree.fromstring(images.content).iter() if e.tag.endswith("imageId")]
    run = await send(
        {
            "Action": "RunInstances",
            "Version": "2016-11-15",
            "ImageId": known[0],
            "MinCount": "1",
            "MaxCount": "1",
            "InstanceType": "tiny",
        }
    )
    assert run.status_code == 200, run.text
    known += [e.text or "" for e in ElementTree.fromstring(run.content).iter() if e.tag.endswith("instanceId")]
    known += ["tiny", "small", "debian-12"]

    gen = Generator(random.Random(20261123), known)
    statuses: dict[int, int] = {}
    with caplog.at_level(logging.ERROR, logger="nephos"):
        for _ in range(REQUESTS):
            form = gen.request()
            reply = await send(form)
            statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
            assert reply.status_code < 500, (form, reply.text)
            assert b"Traceback" not in reply.content and b'File "' not in reply.content, (form, reply.text)
            root = ElementTree.fromstring(reply.content)  # always XML
            if reply.status_code >= 400:
                assert root.find("Errors/Error/Code") is not None and root.find("RequestID") is not None
    print(f"EC2 fuzz: {REQUESTS} requests, statuses {sorted(statuses.items())}")
    unexpected = [rec for rec in caplog.records if rec.exc_info]
    assert not unexpected, unexpected[0].getMessage()
    assert statuses.get(200, 0) > REQUESTS // 20, statuses  # some get all the way through
