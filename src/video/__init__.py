"""Source video in: decode any video by content to RGB frames on the 25 fps output timeline, and its soundtrack."""

from .source import FPS, MAX_FRAMES, SourceVideo, VideoInputError, read_video, video_audio

__all__ = ["FPS", "MAX_FRAMES", "SourceVideo", "VideoInputError", "read_video", "video_audio"]
