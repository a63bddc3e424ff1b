"""Cog's OpenAPI schema for the predictor named in cog.yaml, as `cog build` writes it to `.cog/openapi_schema.json`.

    python -m tools.openapi_schema > .cog/openapi_schema.json      (or: make schema)

coglet validates requests against that file and nothing else, and `cog build` makes it with a Go parser we cannot
run here. So the predictor is introspected with cog's own SDK (`cog._inspector`, pinned cog==0.23.1) and the
document is assembled by the rules of cog's generator (`pkg/schema/openapi_spec.go`): `x-order`, choices as an
`allOf` reference to an enum component named after the input, ge/le as minimum/maximum, `Optional` as nullable and
not required, a None default on a non-Optional input as required, the Go encoder's key order. Indented for diffs.
"""

from __future__ import annotations

import ast
import inspect
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml
from cog import __version__ as cog_version
from cog import _adt as adt
from cog import _inspector

REPO = Path(__file__).resolve().parents[1]
NULLABLE = (adt.Repetition.OPTIONAL, adt.Repetition.OPTIONAL_REPEATED)
# Optional constraints of an Input() and their OpenAPI keys, in cog's order.
BOUNDS = (
    ("ge", "minimum"),
    ("le", "maximum"),
    ("min_length", "minLength"),
    ("max_length", "maxLength"),
    ("regex", "pattern"),
)


class Ordered(dict):
    """A JSON object whose keys keep insertion order (the Go generator's orderedMap); plain dicts are sorted."""


def predictor_ref(cog_yaml: Path = REPO / "cog.yaml") -> tuple[str, str]:
    config = yaml.safe_load(cog_yaml.read_text())
    module_file, _, name = (config.get("run") or config["predict"]).partition(":")
    return Path(module_file).with_suffix("").as_posix().replace("/", "."), name


def title_case(name: str) -> str:
    return name.replace("_", " ").title()


def build_schema(module: str, name: str) -> dict[str, Any]:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    info = _inspector.create_predictor(module, name)
    predictor = getattr(sys.modules[module], name)
    method = _inspector._unwrap(predictor.run if "run" in vars(predictor) else predictor.predict)
    parameters = inspect.signature(method).parameters
    explicit = explicit_defaults(method)

    properties, required, enums = Ordered(), [], []
    for field in info.inputs.values():
        prop: dict[str, Any] = {"x-order": field.order}
        if field.choices:
            enums.append(
                (
                    field.name,
                    {
                        "title": field.name,
                        "description": "An enumeration.",
                        "enum": list(field.choices),
                        "type": field.type.primitive.json_type()["type"],
                    },
                )
            )
            prop["allOf"] = [{"$ref": f"#/components/schemas/{field.name}"}]
        else:
            prop["title"] = title_case(field.name)
            prop.update(field.type.json_type())

        nullable = field.type.repetition in NULLABLE or (
            field.type.primitive is adt.PrimitiveType.SECRET and field.default is None and field.name in explicit
        )
        has_default = field.name in explicit and (field.default is not None or nullable)
        if not has_default and field.type.repetition not in NULLABLE:
            required.append(field.name)
        if has_default:
            prop["default"] = field.default
        if nullable:
            prop["nullable"] = True
        if field.description is not None:
            prop["description"] = field.description
        for attribute, key in BOUNDS:
            if getattr(field, attribute) is not None:
                prop[key] = getattr(field, attribute)
        if field.deprecated:
            prop["deprecated"] = True
        accept = getattr(parameters[field.name].default, "accept", None)
        if accept is not None:
            prop["x-cog-accept"] = accept
        properties[field.name] = prop

    input_schema = {"title": "Input", "type": "object", "properties": properties}
    if required:
        input_schema["required"] = required
    return openapi_document(input_schema, info.output.json_type(), enums)


def explicit_defaults(method) -> set[str]:
    """Parameters whose source gives a default (`= value` or `Input(default=...)`), as cog's Go parser sees them.

    At run time `Input(description=...)` and `Input(default=None, ...)` are the same object, but the Go generator
    writes `"default": null` only for the second; the source tells them apart.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
    args = tree.body[0].args
    with_defaults = args.args[len(args.args) - len(args.defaults) :]
    return {arg.arg for arg, node in zip(with_defaults, args.defaults) if gives_default(node)}


def gives_default(node: ast.expr) -> bool:
    callee = getattr(node, "func", None)
    if getattr(callee, "id", None) != "Input" and getattr(callee, "attr", None) != "Input":
        return True  # a plain `= value`
    return bool(node.args) or any(keyword.arg == "default" for keyword in node.keywords)


def openapi_document(input_schema: dict, output_schema: dict, enums: list[tuple[str, dict]]) -> dict[str, Any]:
    ok = {"description": "Successful Response", "content": {"application/json": {"schema": {}}}}
    invalid = {
        "description": "Validation Error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
    }
    string = {"type": "string"}
    timestamp = {"type": "string", "format": "date-time"}
    schemas = Ordered(Input=input_schema, Output=output_schema)
    schemas.update(enums)
    schemas["PredictionRequest"] = {
        "title": "PredictionRequest",
        "type": "object",
        "properties": {"id": {"title": "Id", **string}, "input": {"$ref": "#/components/schemas/Input"}},
    }
    schemas["PredictionResponse"] = {
        "title": "PredictionResponse",
        "type": "object",
        "properties": {
            "input": {"$ref": "#/components/schemas/Input"},
            "output": {"$ref": "#/components/schemas/Output"},
            "id": {"title": "Id", **string},
            "version": {"title": "Version", **string},
            "created_at": {"title": "Created At", **timestamp},
            "started_at": {"title": "Started At", **timestamp},
            "completed_at": {"title": "Completed At", **timestamp},
            "status": {"title": "Status", **string},
            "error": {"title": "Error", **string},
            "logs": {"title": "Logs", **string},
            "metrics": {"title": "Metrics", "type": "object"},
        },
    }
    schemas["Status"] = {
        "title": "Status",
        "description": "An enumeration.",
        "enum": ["starting", "processing", "succeeded", "canceled", "failed"],
        "type": "string",
    }
    schemas["HTTPValidationError"] = {
        "title": "HTTPValidationError",
        "type": "object",
        "properties": {
            "detail": {"title": "Detail", "type": "array", "items": {"$ref": "#/components/schemas/ValidationError"}}
        },
    }
    schemas["ValidationError"] = {
        "title": "ValidationError",
        "required": ["loc", "msg", "type"],
        "type": "object",
        "properties": {
            "loc": {"title": "Location", "type": "array", "items": {"anyOf": [string, {"type": "integer"}]}},
            "msg": {"title": "Message", **string},
            "type": {"title": "Error Type", **string},
        },
    }
    paths = Ordered()
    paths["/"] = {"get": {"summary": "Root", "operationId": "root__get", "responses": {"200": ok}}}
    paths["/health-check"] = {
        "get": {"summary": "Healthcheck", "operationId": "healthcheck_health_check_get", "responses": {"200": ok}}
    }
    paths["/predictions"] = {
        "post": {
            "summary": "Predict",
            "description": "Run a single prediction on the model",
            "operationId": "predict_predictions_post",
            "requestBody": {
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}}}
            },
            "responses": {
                "200": {
                    "description": "Successful Response",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionResponse"}}},
                },
                "422": invalid,
            },
        }
    }
    paths["/predictions/{prediction_id}/cancel"] = {
        "post": {
            "summary": "Cancel",
            "operationId": "cancel_predictions__prediction_id__cancel_post",
            "parameters": [
                {
                    "required": True,
                    "schema": {"title": "Prediction Id", **string},
                    "name": "prediction_id",
                    "in": "path",
                }
            ],
            "responses": {"200": ok, "422": invalid},
        }
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": cog_version},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def go_order(value: Any) -> Any:
    """Key order of Go's encoder: sorted for maps, insertion order for `Ordered`; integral floats print as ints."""
    if isinstance(value, Ordered):
        return {k: go_order(v) for k, v in value.items()}
    if isinstance(value, dict):
        return {k: go_order(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [go_order(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def render(schema: dict[str, Any]) -> str:
    text = json.dumps(go_order(schema), indent=2, ensure_ascii=False)
    # Go's encoder escapes these three everywhere.
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") + "\n"


def main() -> None:
    sys.stdout.write(render(build_schema(*predictor_ref())))


if __name__ == "__main__":
    main()
