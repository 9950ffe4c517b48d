"""The EC2 Query protocol: flattened form parameters in, XML out (EC2.md §4).

Requests carry ``Action``, ``Version`` and parameters flattened the EC2 way: lists as
``Name.1``, ``Name.2``; structures as ``Name.Field``; nested as ``Filter.1.Value.2``.
``Params`` reads them back. Replies are ``<{Action}Response xmlns=...>`` with ``requestId``
first, lists as ``<xxxSet><item>...</item></xxxSet>``; errors are the
``<Response><Errors><Error>`` document with the HTTP status of their code.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any
from xml.sax.saxutils import escape

NAMESPACE = "http://ec2.amazonaws.com/doc/{version}/"
DEFAULT_VERSION = "2016-11-15"
_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class Ec2Error(Exception):
    """An error an EC2 client understands: its code, message and HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def missing(name: str) -> Ec2Error:
    return Ec2Error("MissingParameter", f"The request must contain the parameter {name}")


def invalid(name: str, value: object, why: str = "") -> Ec2Error:
    return Ec2Error("InvalidParameterValue", f"Value ({value}) for parameter {name} is invalid. {why}".strip())


class Params:
    """The flattened parameters of one request (``Action`` and the auth ones removed)."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    def get(self, name: str) -> str | None:
        return self.values.get(name)

    def require(self, name: str) -> str:
        value = self.values.get(name)
        if value is None or value == "":
            raise missing(name)
        return value

    def many(self, name: str) -> list[str]:
        """``Name.1``, ``Name.2``, ... in index order."""
        found = []
        pattern = re.compile(rf"^{re.escape(name)}\.(\d+)$")
        for key, value in self.values.items():
            m = pattern.match(key)
            if m:
                found.append((int(m.group(1)), value))
        return [v for _, v in sorted(found)]

    def structs(self, name: str) -> list[Params]:
        """``Name.N.Field...`` as one ``Params`` per N (fields without the prefix), in order."""
        groups: dict[int, dict[str, str]] = {}
        pattern = re.compile(rf"^{re.escape(name)}\.(\d+)\.(.+)$")
        for key, value in self.values.items():
            m = pattern.match(key)
            if m:
                groups.setdefault(int(m.group(1)), {})[m.group(2)] = value
        return [Params(groups[i]) for i in sorted(groups)]

    def sub(self, name: str) -> Params:
        """``Name.Field`` as a ``Params`` of the fields (a structure)."""
        prefix = name + "."
        return Params({k[len(prefix) :]: v for k, v in self.values.items() if k.startswith(prefix)})

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.values.get(name)
        if value is None:
            return default
        if value.lower() in ("true", "1"):
            return True
        if value.lower() in ("false", "0"):
            return False
        raise invalid(name, value, "Expected true or false.")

    def number(self, name: str, default: int | None = None, *, low: int = 0, high: int = 2**31 - 1) -> int | None:
        value = self.values.get(name)
        if value is None or value == "":
            return default
        try:
            number = int(value)
        except ValueError:
            raise invalid(name, value, "Expected an integer.") from None
        if not low <= number <= high:
            raise invalid(name, value, f"Expected a value from {low} to {high}.")
        return number

    def filters(self) -> list[tuple[str, list[str]]]:
        out = []
        for f in self.structs("Filter"):
            name = f.get("Name")
            if not name:
                raise missing("Filter.N.Name")
            out.append((name, f.many("Value")))
        return out


def version_of(value: str | None) -> str:
    """Any date-shaped ``Version`` is echoed in the namespace; anything else gets ours."""
    return value if value and _VERSION.match(value) else DEFAULT_VERSION


# -- XML ---------------------------------------------------------------------------------------

#: Characters XML 1.0 cannot carry at all, even escaped (a client may send them; replies that
#: echo them must still parse).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_escape(text: str) -> str:
    return escape(_NOT_XML.sub("\ufffd", text))


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    return xml_escape(str(value))


def _element(tag: str, value: Any, out: list[str]) -> None:
    if value is None:
        return
    if isinstance(value, dict):
        out.append(f"<{tag}>")
        for k, v in value.items():
            _element(k, v, out)
        out.append(f"</{tag}>")
    elif isinstance(value, list):
        out.append(f"<{tag}>")
        for item in value:
            _element("item", item, out)
        out.append(f"</{tag}>")
    else:
        out.append(f"<{tag}>{_text(value)}</{tag}>")


def render(action: str, version: str, request_id: str, body: dict[str, Any]) -> bytes:
    out = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<{action}Response xmlns="{NAMESPACE.format(version=version)}">',
        f"<requestId>{request_id}</requestId>",
    ]
    for key, value in body.items():
        _element(key, value, out)
    out.append(f"</{action}Response>")
    return "".join(out).encode()


def render_error(code: str, message: str, request_id: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
        f"<Code>{xml_escape(code)}</Code><Message>{xml_escape(message)}</Message>"
        f"</Error></Errors><RequestID>{request_id}</RequestID></Response>"
    ).encode()
