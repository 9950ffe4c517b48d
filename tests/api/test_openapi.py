"""Swagger UI shows every route with its request, reply and error models."""

from __future__ import annotations

from app.api.app import create_app

SPEC = create_app().openapi()


def test_every_operation_is_documented_with_models() -> None:
    operations = [(path, method, op) for path, ops in SPEC["paths"].items() for method, op in ops.items()]
    assert len(operations) >= 25
    for path, method, op in operations:
        where = f"{method.upper()} {path}"
        assert op.get("description") or op.get("summary"), where
        codes = set(op["responses"])
        success = [c for c in codes if c.startswith("2")]
        assert success, where
        if path != "/healthz":
            assert {"401", "422"} <= codes, where
            assert op["responses"]["401"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"
            }, where
        for code in success:
            if code != "204":
                assert "schema" in op["responses"][code]["content"]["application/json"], where
        if method in ("post", "patch") and path not in (
            "/api/v1/credentials/ec2",
            "/api/v1/admin/hosts/{host}/domains/{domain_uuid}/destroy",
            "/api/v1/public-ips/{ip_id}/disassociate",
        ):
            assert "requestBody" in op, where


def test_error_codes_of_the_contract_are_documented() -> None:
    create = SPEC["paths"]["/api/v1/servers"]["post"]["responses"]
    assert {"400", "401", "409", "413", "422", "503"} <= set(create)
    assert "Idempotency-Key" in [p["name"] for p in SPEC["paths"]["/api/v1/servers"]["post"]["parameters"]]
    actions = SPEC["paths"]["/api/v1/servers/{server_id}/actions"]["post"]
    assert {"200", "202", "403", "404", "409"} <= set(actions["responses"])
    body = actions["requestBody"]["content"]["application/json"]["schema"]
    assert body["discriminator"]["propertyName"] == "action"
    assert SPEC["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
