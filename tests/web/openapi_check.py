"""Checking an app's /openapi.json and real answers against it (JSON Schema 2020-12, as OpenAPI 3.1 says)."""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator

JSON = "application/json"


def check_document(doc: dict[str, Any]) -> None:
    """The document is OpenAPI 3.1 and every schema in it is a valid JSON Schema 2020-12."""
    assert doc["openapi"] == "3.1.0"
    for name, schema in doc["components"]["schemas"].items():
        try:
            Draft202012Validator.check_schema(schema)
        except Exception as exc:  # pragma: no cover - the message is the point
            raise AssertionError(f"components/schemas/{name} is not a valid JSON schema: {exc}") from exc
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, answer in op["responses"].items():
                for media, content in answer.get("content", {}).items():
                    if "schema" in content:
                        Draft202012Validator.check_schema(content["schema"])
            for media, content in op.get("requestBody", {}).get("content", {}).items():
                Draft202012Validator.check_schema(content["schema"])


def operation(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    try:
        return doc["paths"][path][method.lower()]
    except KeyError:
        raise AssertionError(f"{method} {path} is not in /openapi.json (paths: {sorted(doc['paths'])})") from None


def _validator(doc: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    # "#/components/schemas/X" resolves against the root: give the schema the document's components.
    return Draft202012Validator({**schema, "components": doc["components"]})


def answer_schema(doc: dict[str, Any], method: str, path: str, status: int, media: str = JSON) -> dict[str, Any]:
    op = operation(doc, method, path)
    answer = op["responses"].get(str(status))
    assert answer is not None, f"{method} {path} does not declare status {status} (it declares {sorted(op['responses'])})"
    content = answer.get("content", {}).get(media)
    assert content is not None and "schema" in content, f"{method} {path} {status} has no {media} schema"
    return content["schema"]


def validate_answer(doc: dict[str, Any], method: str, path: str, status: int, body: Any, media: str = JSON) -> None:
    """``body`` (parsed JSON, or a list of NDJSON lines) fits the schema declared for ``status``."""
    schema = answer_schema(doc, method, path, status, media)
    validator = _validator(doc, schema)
    items = body if media == "application/x-ndjson" else [body]
    for item in items:
        errors = sorted(validator.iter_errors(item), key=lambda e: list(e.absolute_path))
        if errors:
            where = "/".join(str(p) for p in errors[0].absolute_path) or "(root)"
            raise AssertionError(
                f"{method} {path} {status}: the answer does not fit its schema at {where}: {errors[0].message}\n"
                f"answer: {json.dumps(item)[:2000]}"
            )


def validate_request(doc: dict[str, Any], method: str, path: str, body: Any) -> None:
    """What a client sends fits the declared request schema (so the test's requests are themselves checked)."""
    op = operation(doc, method, path)
    assert "requestBody" in op, f"{method} {path} declares no request body"
    schema = op["requestBody"]["content"][JSON]["schema"]
    errors = list(_validator(doc, schema).iter_errors(body))
    assert not errors, f"{method} {path}: request does not fit its schema: {errors[0].message}"
