"""The committed .cog/openapi_schema.json, which is what a client sees (the HTTP test checks that the server serves
it): it accepts and refuses what cog's own input validation does, and it is built by cog's generator rules."""

import inspect
import json
import typing

import jsonschema
import pytest

from tools.openapi_schema import REPO, build_schema, explicit_defaults, predictor_ref, render

COMMITTED = REPO / ".cog" / "openapi_schema.json"
# The toy predictor below keeps the pre-0.23 names (BasePredictor, predict), which cog's inspector warns about.
pytestmark = pytest.mark.filterwarnings("ignore:.*is deprecated; use:DeprecationWarning")


@pytest.fixture(scope="module")
def committed() -> dict:
    assert COMMITTED.is_file(), "no .cog/openapi_schema.json: run `make schema` (coglet validates nothing without it)"
    return json.loads(COMMITTED.read_text())


def probes(prop: dict, schemas: dict) -> list[object]:
    """Values on and past every edge the schema states for an input: its choices, its bounds, null."""
    if "allOf" in prop:  # choices live in a component of their own
        choices = schemas[prop["allOf"][0]["$ref"].rsplit("/", 1)[1]]["enum"]
        return [*choices, f"not-{choices[0]}", None]
    values: list[object] = {"boolean": [True, False], "string": ["text"]}.get(prop["type"], [])
    step = 1 if prop["type"] == "integer" else 0.25
    for bound in ("minimum", "maximum"):
        if bound in prop:
            values += [prop[bound], prop[bound] - step, prop[bound] + step]
    return [*values, None]


def test_the_committed_schema_accepts_what_cogs_validation_accepts(committed):
    """Each input's edges, one at a time: the schema (as a client validates against it) and cog's `check_input`
    (what the runner is called with) give the same answer, so neither drifted from predict.py."""
    from cog import _inspector

    inputs = _inspector.create_predictor(*predictor_ref()).inputs
    schemas = committed["components"]["schemas"]
    properties = schemas["Input"]["properties"]
    assert list(properties) == list(inputs), "the schema's inputs are not predict.py's: run `make schema`"
    # OpenAPI's choices are a $ref to a component: put them in place for a plain JSON-schema validator.
    resolved = {
        name: {**schemas[prop.pop("allOf")[0]["$ref"].rsplit("/", 1)[1]], **prop} if "allOf" in prop else prop
        for name, prop in json.loads(json.dumps(properties)).items()
    }
    validator = jsonschema.Draft4Validator({"type": "object", "properties": resolved})
    disagreements = []
    for name, prop in properties.items():
        for value in probes(prop, schemas):
            nullable_none = value is None and bool(prop.get("nullable"))
            schema_ok = nullable_none or validator.is_valid({name: value})
            try:
                _inspector.check_input(inputs, {name: value})
                cog_ok = True
            except Exception:  # cog's normalisers raise ValueError, and others for values of the wrong type
                cog_ok = False
            if value is None:
                cog_ok = nullable_none  # cog passes None through; the runner's Optional inputs take it
            if schema_ok != cog_ok:
                disagreements.append(
                    f"{name}={value!r}: schema {'accepts' if schema_ok else 'refuses'}, cog "
                    f"{'accepts' if cog_ok else 'refuses'}"
                )
    assert not disagreements, disagreements
    defaults = {name: prop["default"] for name, prop in properties.items() if "default" in prop}
    assert defaults == {name: v for name, v in _inspector.check_input(inputs, {}).items() if name in defaults}


def _predict_method():
    import importlib

    module, name = predictor_ref()
    return getattr(importlib.import_module(module), name).run


def test_every_input_has_a_description(committed):
    inputs = committed["components"]["schemas"]["Input"]["properties"]
    assert inputs and not [name for name, prop in inputs.items() if not prop.get("description", "").strip()]


def test_no_non_optional_input_defaults_to_none():
    # cog's Go generator turns `x: int = Input(default=None)` into a REQUIRED input; such inputs must be Optional[...].
    method = _predict_method()
    hints = typing.get_type_hints(method)
    explicit = explicit_defaults(method)
    offenders = [
        name
        for name, p in inspect.signature(method).parameters.items()
        if name in explicit
        and getattr(p.default, "default", p.default) is None
        and type(None) not in typing.get_args(hints[name])
    ]
    assert not offenders, f"default None on non-Optional inputs: {offenders}; annotate them Optional[...]"


TOY = """
from typing import Optional
from cog import BasePredictor, Input, Path, Secret


class Predictor(BasePredictor):
    def predict(
        self,
        image: Path = Input(description="An image.", accept="image/*"),
        steps: int = Input(default=4, ge=1, le=50, description="Steps."),
        mode: str = Input(default="copy", choices=["copy", "upper"], description="Mode."),
        seed: int = Input(default=None, description="Seed."),
        scale: Optional[float] = Input(default=None, ge=0.5, le=2.5, description="Scale."),
        note: Optional[str] = Input(description="Note."),
        tag: str = Input(default="ab", regex="^[a-z]+$", min_length=1, max_length=8, description="Tag <a-z> & more."),
        api_key: Secret = Input(default=None, description="Key."),
        count: int = 3,
        level: int = Input(default=2, choices=[1, 2, 3], description="Level."),
    ) -> Path:
        return image
"""


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy")
    (folder / "toy_predictor_for_schema.py").write_text(TOY)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        schema = build_schema("toy_predictor_for_schema", "Predictor")
    return schema


def test_generator_rules_on_a_toy_predictor(toy):
    # Expected values written out by hand from cog's generator rules (pkg/schema/openapi_spec.go, cog-notes §1.2).
    schemas = toy["components"]["schemas"]
    assert list(schemas) == [
        "Input",
        "Output",
        "mode",
        "level",
        "PredictionRequest",
        "PredictionResponse",
        "Status",
        "HTTPValidationError",
        "ValidationError",
    ]
    props = schemas["Input"]["properties"]
    assert list(props) == ["image", "steps", "mode", "seed", "scale", "note", "tag", "api_key", "count", "level"]
    assert props["image"] == {
        "x-order": 0,
        "title": "Image",
        "type": "string",
        "format": "uri",
        "description": "An image.",
        "x-cog-accept": "image/*",
    }
    assert props["steps"] == {
        "x-order": 1,
        "title": "Steps",
        "type": "integer",
        "default": 4,
        "description": "Steps.",
        "minimum": 1,
        "maximum": 50,
    }
    assert props["mode"] == {
        "x-order": 2,
        "allOf": [{"$ref": "#/components/schemas/mode"}],
        "default": "copy",
        "description": "Mode.",
    }
    assert schemas["mode"] == {
        "title": "mode",
        "description": "An enumeration.",
        "enum": ["copy", "upper"],
        "type": "string",
    }
    assert schemas["level"]["type"] == "integer" and schemas["level"]["enum"] == [1, 2, 3]
    # None default on a non-Optional type: required, no default.
    assert props["seed"] == {"x-order": 3, "title": "Seed", "type": "integer", "description": "Seed."}
    assert props["scale"] == {
        "x-order": 4,
        "title": "Scale",
        "type": "number",
        "default": None,
        "nullable": True,
        "description": "Scale.",
        "minimum": 0.5,
        "maximum": 2.5,
    }
    # Optional without a default in the source: nullable, not required, no "default" key.
    assert props["note"] == {"x-order": 5, "title": "Note", "type": "string", "nullable": True, "description": "Note."}
    assert props["tag"] == {
        "x-order": 6,
        "title": "Tag",
        "type": "string",
        "default": "ab",
        "description": "Tag <a-z> & more.",
        "pattern": "^[a-z]+$",
        "minLength": 1,
        "maxLength": 8,
    }
    assert props["api_key"] == {
        "x-order": 7,
        "title": "Api Key",
        "type": "string",
        "format": "password",
        "writeOnly": True,
        "x-cog-secret": True,
        "default": None,
        "nullable": True,
        "description": "Key.",
    }
    assert props["count"] == {"x-order": 8, "title": "Count", "type": "integer", "default": 3}
    assert schemas["Input"]["required"] == ["image", "seed"]
    assert schemas["Output"] == {"title": "Output", "type": "string", "format": "uri"}
    assert list(toy["paths"]) == ["/", "/health-check", "/predictions", "/predictions/{prediction_id}/cancel"]
    assert toy["openapi"] == "3.0.2" and toy["info"] == {"title": "Cog", "version": "0.23.1"}


def test_rendering_follows_gos_encoder(toy):
    text = render(toy)
    assert text.startswith('{\n  "components": {\n    "schemas": {\n      "Input": {\n        "properties": {\n')
    # Go sorts plain map keys, escapes <, > and &, and prints integral floats without a fraction.
    assert '"description": "Tag \\u003ca-z\\u003e \\u0026 more."' in text
    steps = text[text.index('"steps": {') : text.index('"mode": {')]
    assert [line.split('"')[1] for line in steps.splitlines()[1:-2]] == [
        "default",
        "description",
        "maximum",
        "minimum",
        "title",
        "type",
        "x-order",
    ]
    assert '"maximum": 50,' in steps and '"maximum": 2.5,' in text
    assert json.loads(text) == json.loads(json.dumps(toy))
