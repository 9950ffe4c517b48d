"""``app/api/ec2/params.py``: every action has its parameter list, and it is enforced.

Run as a module, this prints the table afresh from the installed botocore's EC2 model.
"""

from __future__ import annotations

import textwrap
from urllib.parse import urlencode

import botocore
import botocore.session
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.serialize import EC2Serializer

from app.api.ec2.params import PARAMETERS
from app.api.ec2.router import ACTIONS
from tests.conftest import Cloud


def model_parameters(action: str) -> list[str]:
    op = botocore.session.get_session().get_service_model("ec2").operation_model(action)
    serializer = EC2Serializer()
    return sorted(serializer._get_serialized_name(shape, member) for member, shape in op.input_shape.members.items())


def test_every_action_has_its_parameters_and_every_one_it_reads() -> None:
    assert set(PARAMETERS) == set(ACTIONS)
    for action, names in PARAMETERS.items():
        # What the model had when the table was made: a later botocore may add names (clients
        # sending those get UnknownParameter until the table is regenerated), never rename them.
        assert "DryRun" in names and set(names) & set(model_parameters(action)), action


async def test_unknown_parameters_are_refused_and_unused_ones_accepted(pg_cloud: Cloud) -> None:
    headers = await pg_cloud.user()
    r = await pg_cloud.client.post("/api/v1/credentials/ec2", headers=headers)
    credentials = Credentials(r.json()["access_key"], r.json()["secret_key"])

    async def send(form: dict[str, str]) -> tuple[int, str]:
        body = urlencode({"Version": "2016-11-15", **form})
        request = AWSRequest(
            method="POST",
            url="http://nephos.test/ec2/",
            data=body,
            headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
        )
        SigV4Auth(credentials, "ec2", "us-east-1").add_auth(request)
        reply = await pg_cloud.client.post("/ec2/", content=body, headers=dict(request.headers.items()))
        return reply.status_code, reply.text

    status, text = await send({"Action": "DescribeRegions", "Colour": "blue"})
    assert status == 400 and "<Code>UnknownParameter</Code>" in text and "Colour" in text
    status, text = await send({"Action": "DescribeInstances", "Filter.1.Nme": "x", "InstanceIds.1": "i-1"})
    assert status == 400 and "InstanceIds" in text
    # A parameter of the action Nephos has no use for: accepted, as ec2-api does.
    status, text = await send({"Action": "DescribeRegions", "AllRegions": "true"})
    assert status == 200, text


def main() -> None:
    lines = [
        '"""Each action\'s parameters, as EC2 names them on the wire (the first segment of a flattened',
        f"name: ``Filter`` for ``Filter.1.Value.2``), from botocore {botocore.__version__}'s EC2 model.",
        "",
        "A parameter of the action that Nephos has no use for (``SubnetId``, ``Monitoring``...) is",
        "accepted and ignored, as ec2-api does; a name that is no parameter of the action at all is",
        "``UnknownParameter`` (400). Regenerate after adding an action::",
        "",
        "    .venv/bin/python -m tests.api.test_ec2_params > app/api/ec2/params.py",
        '"""',
        "",
        "PARAMETERS: dict[str, frozenset[str]] = {",
    ]
    for action in sorted(ACTIONS):
        lines.append(f'    "{action}": frozenset({{')
        lines += ["        " + w for w in textwrap.wrap(", ".join(f'"{n}"' for n in model_parameters(action)), 100)]
        lines.append("    }),")
    lines.append("}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
