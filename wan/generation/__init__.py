"""From a request to frames: conditioning, clip schedule, sampling, the clip loop, and mp4 writing."""
