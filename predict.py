"""Cog's entry point: the runner's inputs, documented for the user, and the calls into the service (`service/`)."""

import logging
from typing import Optional

from cog import BaseRunner, Input, Path, current_scope

from service.talking_video import MAX_FRAMES, MODELS, RESOLUTIONS, TalkingVideoRequest, TalkingVideoService
from src.audio import DEFAULT_VOICES, VOICES
from wan.configs import FPS


class Runner(BaseRunner):
    def setup(self, weights: Optional[str] = None) -> None:
        # Cog shows the runner process's log to the user: one line a stage, as the service writes them (a handler of
        # our own only where the process has none).
        logging.basicConfig(format="%(message)s")
        logging.getLogger().setLevel(logging.INFO)
        self.service = TalkingVideoService(weights)

    def run(
        self,
        image: Optional[Path] = Input(
            default=None,
            description="Image with one or two people (two: person 1 left, person 2 right). Leave it out with a video.",
        ),
        audio: Optional[Path] = Input(
            default=None,
            description="Speech of person 1: any audio file, or a video to take the sound from. Optional with a "
            "video: its own soundtrack is used. Leave it out with text.",
        ),
        video: Optional[Path] = Input(
            default=None,
            description="A video to dub, instead of an image: with model=infinitetalk every clip follows its frames; "
            "with multitalk its first frame stands in for the image. Any container and codec, read at 25 fps.",
        ),
        second_audio: Optional[Path] = Input(default=None, description="Speech of person 2 (optional)."),
        text: Optional[str] = Input(
            default=None,
            description="Words to speak instead of audio (Kokoro-82M; the voice sets the language): person 1's "
            "text, or a dialogue with every turn marked, '(s1) Hello! (s2) Hi, how are you?', spoken by voice and "
            "second_voice in turn. Newlines split it into paragraphs. The video is as long as the speech.",
        ),
        voice: str = Input(
            default=DEFAULT_VOICES[0],
            choices=list(VOICES),
            description="Kokoro voice of person 1 for text, and the language the text is read in: a = American "
            "English, b = British English, z = Mandarin Chinese; f = female, m = male.",
        ),
        second_voice: str = Input(
            default=DEFAULT_VOICES[1], choices=list(VOICES), description="Kokoro voice of person 2 in a dialogue."
        ),
        model: str = Input(
            default="multitalk",
            choices=list(MODELS),
            description="multitalk: MeiGen MultiTalk; infinitetalk: its successor, which re-anchors every clip on the "
            "image or the source video (dubbing, long videos).",
        ),
        prompt: str = Input(
            default="A person talking naturally, clear lip movements, realistic facial expressions.",
            description="What the video shows.",
        ),
        negative_prompt: str = Input(default="", description="What to avoid; empty uses the model's default."),
        audio_type: str = Input(
            default="add",
            choices=["add", "para"],
            description="Two speakers: 'add' = person 1 speaks, then person 2; 'para' = both at the same time.",
        ),
        person1_bbox: Optional[str] = Input(
            default=None, description="Box of person 1 as 'x1,y1,x2,y2' in image pixels (default: left half)."
        ),
        person2_bbox: Optional[str] = Input(
            default=None, description="Box of person 2 as 'x1,y1,x2,y2' in image pixels (default: right half)."
        ),
        num_frames: Optional[int] = Input(
            default=None,
            ge=5,
            le=MAX_FRAMES,
            description="Frames at 25 fps. Default: as long as the audio (up to 10 min), as far as the 30-minute "
            "limit allows: a request that would take longer is refused, naming the longest audio that fits.",
        ),
        resolution: str = Input(default="480p", choices=list(RESOLUTIONS), description="Output resolution bucket."),
        sampling_steps: Optional[int] = Input(
            default=None, ge=2, le=100, description="Denoising steps (default: 40; 4 in fast mode)."
        ),
        turbo: bool = Input(default=True, description="Faster sampling: TeaCache and lighter guidance."),
        fast: bool = Input(
            default=False,
            description="Step-distilled lightx2v LoRA: 4 steps of 2 passes, ~10x faster than turbo. Overrides turbo.",
        ),
        lora_url: Optional[str] = Input(
            default=None,
            description="Your own Wan 2.1 14B LoRA (.safetensors, at most 4 GiB), merged into the model: an http(s) "
            "URL, or a Hugging Face file as owner/repo/file.safetensors.",
        ),
        lora_scale: float = Input(default=1.0, ge=0.0, le=4.0, description="Strength of the LoRA from lora_url."),
        text_guidance_scale: Optional[float] = Input(
            default=None, ge=0.0, le=20.0, description="Prompt guidance (default from the preset)."
        ),
        audio_guidance_scale: Optional[float] = Input(
            default=None, ge=0.0, le=20.0, description="Audio (lip-sync) guidance (default from the preset)."
        ),
        color_correction_strength: float = Input(
            default=1.0,
            ge=0.0,
            le=1.0,
            description="Match every clip's colours (Lab mean and spread) to the image, against colour drift in long "
            "videos; 0 = off. The reference CLI's default is 1.0.",
        ),
        use_apg: bool = Input(
            default=False,
            description="Adaptive projected guidance (momentum -0.75, norm threshold 55, as the reference CLI) instead "
            "of plain guidance: less over-saturation and drift at high guidance scales.",
        ),
        seed: Optional[int] = Input(default=None, description="Random seed; empty picks one (it is logged)."),
        first_audio: Optional[Path] = Input(
            default=None,
            deprecated=True,
            description="The speech of person 1 under its name in zsxkib/cog-MultiTalk: use audio instead.",
        ),
    ) -> Path:
        video = self.service.run(
            TalkingVideoRequest(
                image=image,
                audio=audio,
                video=video,
                second_audio=second_audio,
                text=text,
                voice=voice,
                second_voice=second_voice,
                model=model,
                prompt=prompt,
                negative_prompt=negative_prompt,
                audio_type=audio_type,
                person1_bbox=person1_bbox,
                person2_bbox=person2_bbox,
                num_frames=num_frames,
                resolution=resolution,
                sampling_steps=sampling_steps,
                turbo=turbo,
                fast=fast,
                lora_url=lora_url,
                lora_scale=lora_scale,
                text_guidance_scale=text_guidance_scale,
                audio_guidance_scale=audio_guidance_scale,
                color_correction_strength=color_correction_strength,
                use_apg=use_apg,
                seed=seed,
                first_audio=first_audio,
            )
        )
        scope = current_scope()
        scope.record_metric("video_output_count", 1)
        scope.record_metric("video_output_duration_seconds", video.frames / FPS)
        scope.record_metric("video_output_total_pixel_count", video.frames * video.height * video.width)
        return Path(video.path)
