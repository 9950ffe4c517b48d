"""SSH key pairs, per project: imported, or generated here with ``cryptography``."""

from __future__ import annotations

import base64
import hashlib
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from sqlalchemy.ext.asyncio import AsyncSession

from app.logic import ec2, idempotency
from app.logic.actor import Actor
from app.logic.errors import BadRequest, NotFound, UnknownKeyPair
from app.logic.pagination import Page, paginate
from app.logic.rows import insert_unique
from app.models import KeyPair, table_of

_keypairs = table_of(KeyPair)
KEY_TYPES = ("ed25519", "rsa")


@dataclass(frozen=True)
class Created:
    keypair: KeyPair
    private_key: str | None


def fingerprint(public_key: str) -> str:
    """OpenSSH's ``SHA256:`` fingerprint of an ``ssh-...`` public key line."""
    blob = base64.b64decode(public_key.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _generate(key_type: str) -> tuple[str, str]:
    key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public.decode(), private.decode()


def _parse_public(public_key: str) -> tuple[str, str]:
    line = public_key.strip()
    try:
        key = serialization.load_ssh_public_key(line.encode())
    except (ValueError, UnsupportedAlgorithm, IndexError):
        raise BadRequest("public_key is not an OpenSSH public key", field="public_key") from None
    kind = "rsa" if isinstance(key, rsa.RSAPublicKey) else line.split()[0].removeprefix("ssh-")
    return line, kind


async def create(
    session: AsyncSession, *, actor: Actor, name: str, public_key: str | None, key_type: str = "ed25519"
) -> Created:
    assert actor.project_id is not None and actor.user_id is not None
    private: str | None = None
    if public_key:
        public, key_type = _parse_public(public_key)
    else:
        if key_type not in KEY_TYPES:
            raise BadRequest(f"key_type is one of {', '.join(KEY_TYPES)}", field="key_type")
        public, private = _generate(key_type)
    keypair = KeyPair(
        project_id=actor.project_id,
        user_id=actor.user_id,
        name=name,
        key_type=key_type,
        public_key=public,
        fingerprint=fingerprint(public),
    )
    await insert_unique(session, keypair, f"key pair {name}")
    return Created(keypair, private)


async def find(session: AsyncSession, *, project_id: uuid.UUID, name: str) -> KeyPair | None:
    stmt = sa.select(KeyPair).where(_keypairs.c.project_id == project_id, _keypairs.c.name == name)
    return (await session.scalars(stmt)).first()


async def list_for(session: AsyncSession, *, actor: Actor, limit: int, cursor: str | None) -> Page[KeyPair]:
    stmt = sa.select(KeyPair).where(_keypairs.c.project_id == actor.project_id)
    return await paginate(session, stmt, _keypairs.c.id, limit=limit, cursor=cursor)


def resource(keypair: KeyPair) -> str:
    """The key pair's name in idempotency records (``idempotency.forget``)."""
    return f"keypair:{keypair.id}"


async def delete(session: AsyncSession, *, actor: Actor, name: str) -> None:
    assert actor.project_id is not None
    keypair = await find(session, project_id=actor.project_id, name=name)
    if keypair is None:
        raise NotFound(f"key pair {name} not found", name=name)
    await idempotency.forget(session, resource(keypair))
    await session.delete(keypair)


# -- as EC2 lists and deletes them ----------------------------------------------------------------


async def listed(
    session: AsyncSession,
    *,
    project_id: uuid.UUID,
    names: list[str],
    ec2_ids: list[str],
    filters: list[tuple[str, list[str]]],
) -> list[KeyPair]:
    """The project's key pairs by name, id and EC2 filters; every one named must exist
    (``UnknownKeyPair``)."""
    stmt = sa.select(KeyPair).where(_keypairs.c.project_id == project_id)
    if names:
        stmt = stmt.where(_keypairs.c.name.in_(names))
    if ec2_ids:
        stmt = stmt.where(_keypairs.c.ec2_id.in_(ec2_ids))
    known: dict[str, ec2.Filter] = {
        "key-name": _keypairs.c.name,
        "fingerprint": _keypairs.c.fingerprint,
        "key-pair-id": _keypairs.c.ec2_id,
        "key-type": _keypairs.c.key_type,
    }
    keys = list(await session.scalars(ec2.where(stmt, known, filters).order_by(_keypairs.c.name)))
    unknown = sorted((set(names) - {k.name for k in keys}) | (set(ec2_ids) - {k.ec2_id for k in keys}))
    if unknown:
        raise UnknownKeyPair(f"The key pair '{', '.join(unknown)}' does not exist", name=", ".join(unknown))
    return keys


async def delete_if_there(
    session: AsyncSession, *, project_id: uuid.UUID, name: str | None, ec2_id: str | None
) -> KeyPair | None:
    """Delete the key pair named (or with that EC2 id) if it exists: deleting one that is not
    there succeeds, as on AWS."""
    stmt = sa.select(KeyPair).where(_keypairs.c.project_id == project_id)
    stmt = stmt.where(_keypairs.c.name == name) if name else stmt.where(_keypairs.c.ec2_id == ec2_id)
    keypair = (await session.scalars(stmt)).first()
    if keypair is not None:
        await idempotency.forget(session, resource(keypair))
        await session.delete(keypair)
    return keypair
