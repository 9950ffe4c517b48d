"""/api/v1/keypairs and /api/v1/credentials/ec2: a user's SSH keys and EC2 access keys."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from app.api.deps import CommittingRoute, CurrentUser, Cursor, IdempotentDep, PageLimit, StateDep, TxDep
from app.api.errors import responses
from app.api.schemas import Ec2CredentialOut, KeyPairCreate, KeyPairOut, MeOut, Page
from app.logic import accounts, keypairs
from app.logic.pagination import DEFAULT_LIMIT

router = APIRouter(prefix="/api/v1", tags=["keys"], route_class=CommittingRoute)


@router.get("/me", response_model=MeOut, tags=["accounts"], responses=responses())
async def me(actor: CurrentUser) -> MeOut:
    """Who the token is: its user, project and role (what a console shows and offers)."""
    return MeOut(user_id=actor.user_id, project_id=actor.project_id, is_admin=actor.is_admin)


def _keypair(k: object, private_key: str | None = None) -> KeyPairOut:
    return KeyPairOut.model_validate({**vars(k), "private_key": private_key})


@router.post("/keypairs", status_code=201, response_model=KeyPairOut, responses=responses(400, 409))
async def create_keypair(body: KeyPairCreate, tx: TxDep, actor: CurrentUser, idem: IdempotentDep) -> JSONResponse:
    """Import a public key, or generate a key pair and return its private key once."""

    async def make() -> KeyPairOut:
        made = await keypairs.create(
            tx.session, actor=actor, name=body.name, public_key=body.public_key, key_type=body.key_type
        )
        idem.created(keypairs.resource(made.keypair))
        return _keypair(made.keypair, made.private_key)

    return await idem.run(201, make)


@router.get("/keypairs", response_model=Page[KeyPairOut], responses=responses(400))
async def list_keypairs(
    tx: TxDep, actor: CurrentUser, limit: PageLimit = DEFAULT_LIMIT, cursor: Cursor = None
) -> Page[KeyPairOut]:
    """The project's key pairs (public parts)."""
    page = await keypairs.list_for(tx.session, actor=actor, limit=limit, cursor=cursor)
    return Page(items=[_keypair(k) for k in page.items], next_cursor=page.next_cursor)


@router.delete("/keypairs/{name}", status_code=204, responses=responses(404))
async def delete_keypair(name: str, tx: TxDep, actor: CurrentUser) -> Response:
    """Delete a key pair (servers built with it keep their key)."""
    await keypairs.delete(tx.session, actor=actor, name=name)
    return Response(status_code=204)


@router.post("/credentials/ec2", status_code=201, response_model=Ec2CredentialOut, responses=responses(400, 409))
async def create_ec2_credential(tx: TxDep, actor: CurrentUser, state: StateDep, idem: IdempotentDep) -> JSONResponse:
    """A new EC2 access key; its secret is shown in this reply only."""

    async def make() -> Ec2CredentialOut:
        made = await accounts.create_ec2_credential(tx.session, actor=actor, cipher=state.cipher)
        idem.created(accounts.credential_resource(made.credential.access_key))
        return Ec2CredentialOut(
            access_key=made.credential.access_key, created_at=made.credential.created_at, secret_key=made.secret_key
        )

    return await idem.run(201, make)


@router.get("/credentials/ec2", response_model=Page[Ec2CredentialOut], responses=responses(400))
async def list_ec2_credentials(
    tx: TxDep, actor: CurrentUser, limit: PageLimit = DEFAULT_LIMIT, cursor: Cursor = None
) -> Page[Ec2CredentialOut]:
    """The caller's EC2 access keys (never their secrets)."""
    page = await accounts.list_ec2_credentials(tx.session, actor=actor, limit=limit, cursor=cursor)
    items = [Ec2CredentialOut(access_key=c.access_key, created_at=c.created_at) for c in page.items]
    return Page(items=items, next_cursor=page.next_cursor)


@router.delete("/credentials/ec2/{access_key}", status_code=204, responses=responses(404))
async def delete_ec2_credential(access_key: str, tx: TxDep, actor: CurrentUser) -> Response:
    """Revoke an EC2 access key."""
    await accounts.delete_ec2_credential(tx.session, actor=actor, access_key=access_key)
    return Response(status_code=204)
