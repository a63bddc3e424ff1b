"""MultiTalk on Wan2.1-I2V-14B: the DiT, its encoders, and the generation pipeline."""

from .configs import DiTConfig
from .pipeline import MultiTalkPipeline

__all__ = ["DiTConfig", "MultiTalkPipeline"]
