"""Video in and out: the source picture as a viewer shows it (`picture`), a source video decoded by content onto the
25 fps output timeline with its soundtrack (`source`), and the generated video written as an H.264 + AAC mp4 while it
is made (`mp4`)."""

from .mp4 import Mp4Writer, probe_video, write_mp4
from .picture import PictureInputError, read_picture
from .source import SourceVideo, VideoInputError, read_frames, read_video, video_audio

__all__ = [
    "Mp4Writer",
    "PictureInputError",
    "SourceVideo",
    "VideoInputError",
    "probe_video",
    "read_frames",
    "read_picture",
    "read_video",
    "video_audio",
    "write_mp4",
]
