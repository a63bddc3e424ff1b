"""MultiTalk on Wan2.1-I2V-14B: the DiT, its encoders, and the generation pipeline.

Layers, each importing only those before it: `configs` -> `model` (the DiT) and `encoders` (umT5, CLIP, VAE) ->
`loading` (published files, LoRAs, downloads) -> `generation` (the clip loop) -> `factory` (`load_pipeline`) and
`reference` (the reference's `MultiTalkPipeline` interface). Names below import on first use, so `import wan.model.dit`
needs torch alone.
"""

import importlib

_EXPORTS = {
    "DiTConfig": "configs",
    "WAN_CONFIGS": "configs",
    "GenerationRequest": "generation.request",
    "SamplingOptions": "generation.request",
    "GuidanceOptions": "generation.request",
    "Pipeline": "generation.pipeline",
    "load_pipeline": "factory",
    "MultiTalkPipeline": "reference",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wan' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
