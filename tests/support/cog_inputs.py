"""Runner inputs as cog fills them from a request."""

from __future__ import annotations


def run_inputs(**inputs) -> dict:
    """`inputs` completed with the runner's own defaults, as cog fills them (file paths stay strings)."""
    from cog import _inspector

    return _inspector.check_input(_inspector.create_predictor("predict", "Runner").inputs, inputs)
