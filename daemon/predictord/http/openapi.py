"""The daemon's HTTP surface as an OpenAPI 3.1 document (``GET /openapi.json``): its own routes, and one
``POST /NAME`` and ``GET /NAME`` per API in the status document."""

from __future__ import annotations

from typing import Any

from .. import __version__

ERROR = {"$ref": "#/components/schemas/Error"}
ANY_JSON: dict[str, Any] = {}
REQUEST_ID = {"X-Request-ID": {"$ref": "#/components/headers/X-Request-ID"}}
ERROR_CODES = {
    "400": "The body does not match its Content-Type (malformed JSON, bad charset, bad form).",
    "401": "A token is configured ([server] auth_token_file) and the request did not carry it.",
    "408": "The request did not arrive within [server] read_timeout.",
    "413": "The body is over [server] max_body_bytes.",
    "431": "The request line and headers are over [server] max_header_bytes.",
    "500": "predict() raised, or returned something that cannot be sent; the traceback is in the server's log.",
    "502": "The model worker running the request died; it is being replaced.",
    "503": "The API is loading, failed to load, or its queue is full (see Retry-After).",
    "504": "The request took longer than the API's [serving] timeout.",
}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "headers": REQUEST_ID, "content": {"application/json": {"schema": ERROR}}}


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "headers": REQUEST_ID,
            "content": {"application/json": {"schema": schema if schema is not None else ANY_JSON}}}


def _predict(name: str, status: dict[str, Any]) -> dict[str, Any]:
    serving = status.get("serving") or {}
    timeout = serving.get("timeout")
    about = f" Requests past {timeout:g}s get 504." if isinstance(timeout, (int, float)) else ""
    # What predict() returns decides the type: JSON, text, bytes, a stream, or the predictor's own Response.
    anything = {"schema": ANY_JSON}
    return {
        "operationId": f"predict_{name}",
        "summary": f"Run API {name}'s predict() on the body.",
        "description": "The payload follows the Content-Type: JSON is parsed, text/plain is a str (charset "
                       "honoured), forms are FormData, anything else is bytes." + about,
        "tags": ["predict"],
        "requestBody": {"required": False, "content": {
            "application/json": {"schema": ANY_JSON},
            "text/plain": {"schema": {"type": "string"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        }},
        "responses": {
            "200": {"description": "What predict() returned.", "headers": REQUEST_ID,
                    "content": {"application/json": anything, "text/plain": anything,
                                "application/octet-stream": anything}},
            **{code: _error(text) for code, text in ERROR_CODES.items()},
            "default": {"description": "A status the predictor chose (HTTPException or its own Response)."},
        },
    }


def _status(name: str) -> dict[str, Any]:
    return {"operationId": f"status_{name}", "summary": f"API {name}'s state, versions, replicas and settings.",
            "tags": ["status"], "responses": {"200": _json("The API's status.", {"type": "object"}),
                                              "401": _error(ERROR_CODES["401"])}}


def _own(summary: str, ok: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"get": {"summary": summary, "tags": ["daemon"], "responses": {"200": ok, **(extra or {})}}}


def document(status: dict[str, Any], predict_token: bool = False, admin_token: bool = False) -> dict[str, Any]:
    """The OpenAPI document for the APIs of the status document (and which routes ask for a bearer token)."""
    paths: dict[str, Any] = {
        "/": _own("Every API and model worker (JSON; a browser asking for HTML gets the status page).",
                  _json("The daemon's status.", {"type": "object", "required": ["apis", "workers"]}),
                  {"401": _error(ERROR_CODES["401"])}),
        "/healthz": _own("200 while the daemon is alive (its master's loop ticks).",
                         _json("Alive.", {"type": "object"}),
                         {"503": _error("The master's loop has stopped ticking; the error says for how long.")}),
        "/readyz": _own("200 when the host has settled: no API still loading (failed ones are listed, not "
                        "counted) and every model worker up. With ?api=NAME: 200 when that API has a ready replica.",
                        _json("Ready.", {"type": "object"}),
                        {"503": _error("Not ready: APIs loading, a model worker down, stopping, or (with api=) that "
                                       "API has no ready replica; the error says which."),
                         "404": _error("With api=: no API of that name here.")}),
        "/metrics": _own("Prometheus metrics, merged across every process.", {
            "description": "Prometheus text format.", "headers": REQUEST_ID,
            "content": {"text/plain": {"schema": {"type": "string"}}}}, {"401": _error(ERROR_CODES["401"])}),
        "/openapi.json": _own("This document.", _json("OpenAPI 3.1.", {"type": "object"}),
                              {"401": _error(ERROR_CODES["401"])}),
    }
    paths["/readyz"]["get"]["parameters"] = [{"name": "api", "in": "query", "required": False, "schema": {
        "type": "string"}, "description": "An API's own readiness, for a balancer's per-API health check."}]
    for name, api in sorted(status.get("apis", {}).items()):
        paths[f"/{name}"] = {"post": _predict(name, api or {}), "get": _status(name)}
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    for path, operations in paths.items():
        for method, operation in operations.items():
            asks = predict_token if method == "post" else admin_token and path not in ("/healthz", "/readyz")
            if asks:
                operation["security"] = bearer
    return {
        "openapi": "3.1.0",
        "info": {"title": "predictord", "version": __version__,
                 "description": "Python predictors served over HTTP: POST /NAME runs API NAME. Every error body is "
                                "JSON with an `error` field, and every response carries X-Request-ID."},
        "paths": paths,
        "components": {
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {
                "error": {"type": "string", "description": "What went wrong and what to do about it."},
                "request_id": {"type": "string"}, "api": {"type": "string"}}}},
            "headers": {"X-Request-ID": {"description": "The request's id: the client's, echoed, or a new one.",
                                         "schema": {"type": "string"}}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
