from __future__ import annotations

from predictord.http.openapi import document

ROUTES = {"apis": {"b": {"serving": {"timeout": 2.5}}, "a": {}}}  # a status document: GET /NAME per API


def test_one_post_and_get_per_api_beside_the_own_routes() -> None:
    doc = document(ROUTES)
    assert list(doc["paths"]) == ["/", "/healthz", "/readyz", "/metrics", "/openapi.json", "/a", "/b"]
    assert doc["paths"]["/b"]["post"]["operationId"] == "predict_b"
    assert "Requests past 2.5s get 504." in doc["paths"]["/b"]["post"]["description"]
    assert "504" not in doc["paths"]["/a"]["post"]["description"], "no timeout known, none claimed"
    errors = doc["paths"]["/a"]["post"]["responses"]
    assert all(errors[c]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
               for c in ("400", "401", "408", "413", "431", "500", "502", "503", "504"))
    assert not any("security" in op for ops in doc["paths"].values() for op in ops.values())


def test_security_follows_the_tokens() -> None:
    predict_only = document(ROUTES, predict_token=True)
    assert predict_only["paths"]["/a"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in predict_only["paths"]["/a"]["get"]
    admin = document(ROUTES, admin_token=True)
    secured = {path for path, ops in admin["paths"].items() if "security" in ops["get"]}
    assert secured == {"/", "/metrics", "/openapi.json", "/a", "/b"}
    assert "security" not in admin["paths"]["/a"]["post"]
