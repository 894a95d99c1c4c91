"""The OpenAPI document describes exactly the routes the management API serves."""

from __future__ import annotations

from typing import Any

from plugins.ota.http.admin import admin_app
from plugins.ota.http.openapi import OPENAPI


def test_every_route_is_documented_and_nothing_else() -> None:
    """Each (method, path) the aiohttp app registers appears in /api/v1/openapi.json, and vice versa."""
    app = admin_app(service=None, token="t")  # type: ignore[arg-type] - routes only, never served
    served = {
        (route.method.lower(), route.resource.canonical.removeprefix("/api/v1"))
        for route in app.router.routes()
        if route.method != "HEAD"
        and route.resource is not None
        and route.resource.canonical.startswith("/api/v1/")  # not the console's static files
    }
    documented = {
        (method, path)
        for path, item in OPENAPI["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    assert served == documented


def test_document_is_well_formed() -> None:
    """Every operation names a summary and its responses; every $ref resolves."""
    schemas = OPENAPI["components"]["schemas"]

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(OPENAPI):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    for item in OPENAPI["paths"].values():
        for method, op in item.items():
            if method != "parameters":
                assert op["summary"] and op["responses"]


def test_every_list_is_documented_as_paged() -> None:
    """Each GET answering a JSON array takes `limit` and `offset` and names `X-Total-Count` and `Link`."""
    lists = 0
    for path, item in OPENAPI["paths"].items():
        get = item.get("get")
        ok = (get or {}).get("responses", {}).get("200", {})
        schema = ok.get("content", {}).get("application/json", {}).get("schema", {})
        if schema.get("type") != "array":
            continue
        lists += 1
        assert {"limit", "offset"} <= {p["name"] for p in get.get("parameters", [])}, path
        assert {"X-Total-Count", "Link"} <= set(ok.get("headers", {})), path
    assert lists == 7
