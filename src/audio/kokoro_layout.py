"""Kokoro-82M's published layout: its folders and files, the voices served and its config; and random weights in that
layout, at the tiny size (the tests and the demo) or the published one (the GPU benchmark). Only torch here (kokoro's
modules load inside `kokoro_parts`): the benchmark imports this file on a machine without the media libraries.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

KOKORO_SAMPLE_RATE = 24_000
KOKORO_REPO = "hexgrad/Kokoro-82M"
KOKORO_DIR_NAME = "Kokoro-82M"
KOKORO_CONFIG_NAME = "config.json"
KOKORO_WEIGHTS_NAME = "kokoro-v1_0.pth"
TAGGER_REPO = "spacy/en_core_web_sm"
TAGGER_DIR_NAME = "en_core_web_sm"
TAGGER_COMPONENTS = ("tok2vec", "tagger")  # what misaki's G2P runs of the spaCy pipeline (its `enable=`)
# The files spaCy cannot load those parts without (`spacy.load` with the rest excluded; it reads the rest of `vocab/`
# where present).
TAGGER_FILES = (
    *("config.cfg", "meta.json", "tokenizer", "vocab/strings.json"),
    *(f"{component}/{part}" for component in TAGGER_COMPONENTS for part in ("cfg", "model")),
)
# Kokoro-82M v1.0's voices in American English (a*), British English (b*) and Mandarin Chinese (z*), female (*f_)
# and male (*m_). The first letter picks the language of the text too.
VOICES = (
    *("af_heart", "af_alloy", "af_aoede", "af_bella", "af_jessica", "af_kore", "af_nicole", "af_nova", "af_river"),
    *("af_sarah", "af_sky", "am_adam", "am_echo", "am_eric", "am_fenrir", "am_liam", "am_michael", "am_onyx"),
    *("am_puck", "am_santa", "bf_alice", "bf_emma", "bf_isabella", "bf_lily", "bm_daniel", "bm_fable", "bm_george"),
    *("bm_lewis", "zf_xiaobei", "zf_xiaoni", "zf_xiaoxiao", "zf_xiaoyi", "zm_yunjian", "zm_yunxi", "zm_yunxia"),
    "zm_yunyang",
)
LANGUAGES = {"a": "American English", "b": "British English", "z": "Mandarin Chinese"}
DEFAULT_VOICES = ("af_heart", "am_adam")  # the reference's examples
STYLE_DIM = 128  # kokoro splits a voice row at 128 in its code
VOICE_ROWS = 510  # one style per phoneme count, as the published voices


def kokoro_files() -> list[str]:
    """The files read from the Kokoro-82M folder (relative paths)."""
    return [KOKORO_CONFIG_NAME, KOKORO_WEIGHTS_NAME, *(f"voices/{voice}.pt" for voice in VOICES)]


def kokoro_config(symbols: list[str], published_size: bool = False) -> dict:
    """A Kokoro config over `symbols`: Kokoro-82M's architecture at its published size (82 M parameters, for the
    GPU benchmark), else the tiny one (`published_size=False`)."""
    vocab = {symbol: index + 1 for index, symbol in enumerate(symbols)}  # 0 is the pad at both ends
    layers, kernels = (3, [3, 7, 11]) if published_size else (1, [3])
    albert = (768, 12, 2048, 12) if published_size else (32, 2, 64, 1)
    return {
        "istftnet": {
            "upsample_kernel_sizes": [20, 12],
            "upsample_rates": [10, 6],
            "gen_istft_hop_size": 5,
            "gen_istft_n_fft": 20,
            "resblock_dilation_sizes": [[1, 3, 5]] * len(kernels),
            "resblock_kernel_sizes": kernels,
            "upsample_initial_channel": 512,
        },
        "dim_in": 64,
        "dropout": 0.2,
        "hidden_dim": 512,
        "max_conv_dim": 512,
        "max_dur": 50 if published_size else 8,
        "multispeaker": True,
        "n_layer": layers,
        "n_mels": 80,
        "n_token": len(vocab) + 1,
        "style_dim": STYLE_DIM,
        "text_encoder_kernel_size": 5,
        "plbert": dict(
            zip(("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers"), albert),
            max_position_embeddings=512,
            dropout=0.1,
        ),
        "vocab": vocab,
    }


def kokoro_parts(config: dict) -> dict[str, torch.nn.Module]:
    """Kokoro's five parts as `KModel.__init__` builds them from `config`."""
    from kokoro.istftnet import Decoder
    from kokoro.modules import CustomAlbert, ProsodyPredictor, TextEncoder
    from transformers import AlbertConfig

    bert = CustomAlbert(AlbertConfig(vocab_size=config["n_token"], **config["plbert"]))
    return {
        "bert": bert,
        "bert_encoder": torch.nn.Linear(bert.config.hidden_size, config["hidden_dim"]),
        "predictor": ProsodyPredictor(
            style_dim=config["style_dim"],
            d_hid=config["hidden_dim"],
            nlayers=config["n_layer"],
            max_dur=config["max_dur"],
            dropout=config["dropout"],
        ),
        "text_encoder": TextEncoder(
            channels=config["hidden_dim"],
            kernel_size=config["text_encoder_kernel_size"],
            depth=config["n_layer"],
            n_symbols=config["n_token"],
        ),
        "decoder": Decoder(
            dim_in=config["hidden_dim"], style_dim=config["style_dim"], dim_out=config["n_mels"], **config["istftnet"]
        ),
    }


def random_state(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Each tensor drawn afresh: matrices N(0, 1/fan_in), vectors near their neutral value (weight-norm gains and
    norm scales 1, the rest 0)."""
    state = {}
    for name, tensor in module.state_dict().items():
        if not tensor.is_floating_point():
            state[name] = tensor.clone()
        elif tensor.dim() >= 2:
            fan_in = tensor[0].numel()
            state[name] = torch.randn(tensor.shape, generator=generator) / fan_in**0.5
            if name.startswith("generator.conv_post"):  # the log-magnitude of the spectrum: near 0, a waveform near 1
                state[name] *= 0.01
        elif name.endswith(("weight_g", "gamma")) or (name.endswith("weight") and "norm" in name.lower()):
            state[name] = torch.ones(tensor.shape)
        else:
            state[name] = torch.zeros(tensor.shape)
    return state


def write_kokoro(folder: Path, config: dict, seed: int = 0) -> None:
    """Kokoro's files for `config` in the published layout, random weights: `config.json`, `kokoro-v1_0.pth` (each
    part's state dict, keys behind DataParallel's `module.`), and a style table per served voice."""
    generator = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / KOKORO_CONFIG_NAME).write_text(json.dumps(config, ensure_ascii=False, indent=1))
    parts = kokoro_parts(config)
    # Published as DataParallel saved it: every key behind `module.`.
    published = {
        name: {f"module.{key}": value for key, value in random_state(part, generator).items()}
        for name, part in parts.items()
    }
    torch.save(published, folder / KOKORO_WEIGHTS_NAME)
    (folder / "voices").mkdir(exist_ok=True)
    for voice in VOICES:
        style = torch.randn(VOICE_ROWS, 1, 2 * config["style_dim"], generator=generator) * 0.5
        torch.save(style, folder / "voices" / f"{voice}.pt")
