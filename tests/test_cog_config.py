"""cog.yaml against cog's own JSON schema, plus the rules cog enforces beyond it (pkg/config/validate.go)."""

import importlib.util
import json
import os
import re
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA = Path(os.environ.get("COG_CONFIG_SCHEMA", REPO / "tests" / "data" / "cog" / "config_schema_v1.0.json"))


def _config() -> dict:
    return yaml.safe_load((REPO / "cog.yaml").read_text())


def test_cog_yaml_matches_cogs_schema():
    errors = list(jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).iter_errors(_config()))
    assert not errors, [e.message for e in errors]


def test_schema_check_rejects_a_broken_config():
    broken = {"build": {"gpu": "yes", "python_version": "3.11"}, "predict": "p.py:P", "run": "p.py:R", "x": 1}
    assert len(list(jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).iter_errors(broken))) >= 3


def test_rules_beyond_the_schema():
    config = _config()
    build = config["build"]
    assert build["gpu"] is True
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", build["cuda"]), (
        "cuda must be named explicitly (torch 2.13 is not in cog's table)"
    )
    assert str(build["python_version"]) == "3.11"
    assert not ("python_packages" in build and "python_requirements" in build)
    assert (REPO / build["python_requirements"]).is_file()
    # Media decoding and mp4 writing need no ffmpeg binary: PyAV (pinned) carries libav.
    assert "av==" in (REPO / "requirements.in").read_text()
    # No source builds of CUDA extensions at image build time.
    assert not any("flash-attn" in cmd or "flash_attn" in cmd for cmd in build.get("run", []) or [])


def test_run_reference_resolves():
    module_file, _, class_name = _config()["run"].partition(":")
    path = REPO / module_file
    assert path.is_file()
    spec = importlib.util.spec_from_file_location("predict_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from cog import BaseRunner

    assert issubclass(getattr(module, class_name), BaseRunner)
