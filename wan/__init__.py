"""MultiTalk and InfiniteTalk on Wan2.1-I2V-14B: the model library.

Layers, each importing only those before it (tests/test_layers.py walks the imports):

    configs -> model (the DiT) -> encoders (umT5, CLIP, VAE) -> loading (the published files, audio layers,
    LoRAs) -> generation (a request planned and generated clip by clip) -> runtime (where and how it runs: memory
    plans, placement, kernels, the compile cache, one worker process per GPU, `load_pipeline`) -> reference (the
    reference's `MultiTalkPipeline` call pattern); `testing` (the tiny checkpoint set, golden cases) on top.

The library knows nothing of Cog, of the environment or of media files: the service (`predict.py`, `service/`,
`src/`) does. Names below import on first use, so `import wan.model.dit` needs torch alone.
"""

import importlib

_EXPORTS = {
    "DiTConfig": "configs",
    "WAN_CONFIGS": "configs",
    "GenerationRequest": "generation.request",
    "SamplingOptions": "generation.request",
    "GuidanceOptions": "generation.request",
    "GenerationPlan": "generation.plan",
    "Pipeline": "generation.pipeline",
    "load_pipeline": "runtime.factory",
    "MultiTalkPipeline": "reference",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wan' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
