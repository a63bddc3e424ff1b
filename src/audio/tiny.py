"""A tiny Kokoro-82M and a tiny English tagger in the published layouts, random weights: the text-to-speech path of
the tests and the demo on a CPU. `python -m src.audio.tiny DIR` writes `DIR/Kokoro-82M/` (`config.json`,
`kokoro-v1_0.pth` with its `module.` prefixes, `voices/*.pt`) and `DIR/en_core_web_sm/` (a spaCy pipeline with a
shared tok2vec and a tagger, as the published one has them).

The model keeps Kokoro's architecture: its decoder's widths are fixed in kokoro's code (the text encoder's 512
channels feed it), so only the depth of the text encoder and the predictor, the ALBERT and the vocoder's residual blocks
shrink. Durations are capped at 8 frames a phoneme (Kokoro's 50) so that random weights speak at a natural rate.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .speech import KOKORO_CONFIG_NAME, KOKORO_DIR_NAME, KOKORO_WEIGHTS_NAME, TAGGER_DIR_NAME, VOICES

STYLE_DIM = 128  # kokoro splits a voice row at 128 in its code
VOICE_ROWS = 510  # one style per phoneme count, as the published voices
# Penn Treebank tags, the labels of en_core_web_sm's tagger (misaki reads `token.tag_`).
TAGS = (
    "$ '' , -LRB- -RRB- . : ADD AFX CC CD DT EX FW HYPH IN JJ JJR JJS LS MD NFP NN NNP NNPS NNS PDT POS PRP PRP$ RB RBR "
    "RBS RP SYM TO UH VB VBD VBG VBN VBP VBZ WDT WP WP$ WRB XX _SP ``"
).split()


def tiny_config() -> dict:
    from misaki import en

    mandarin = set("↓→↗↘ɨꭧʰʂʐɻʨʦɕʈɤɥ")  # misaki's Mandarin output beyond the English symbols: tones, retroflexes
    symbols = sorted(en.US_VOCAB | en.GB_VOCAB | mandarin | set(';:,.!?—…"()“” '))
    vocab = {symbol: index + 1 for index, symbol in enumerate(symbols)}  # 0 is the pad at both ends
    return {
        "istftnet": {
            "upsample_kernel_sizes": [20, 12],
            "upsample_rates": [10, 6],
            "gen_istft_hop_size": 5,
            "gen_istft_n_fft": 20,
            "resblock_dilation_sizes": [[1, 3, 5]],
            "resblock_kernel_sizes": [3],
            "upsample_initial_channel": 512,
        },
        "dim_in": 64,
        "dropout": 0.2,
        "hidden_dim": 512,
        "max_conv_dim": 512,
        "max_dur": 8,
        "multispeaker": True,
        "n_layer": 1,
        "n_mels": 80,
        "n_token": len(vocab) + 1,
        "style_dim": STYLE_DIM,
        "text_encoder_kernel_size": 5,
        "plbert": {
            "hidden_size": 32,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 512,
            "num_hidden_layers": 1,
            "dropout": 0.1,
        },
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


def write_tiny_kokoro(folder: Path, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    config = tiny_config()
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
        style = torch.randn(VOICE_ROWS, 1, 2 * STYLE_DIM, generator=generator) * 0.5
        torch.save(style, folder / "voices" / f"{voice}.pt")


def write_tiny_tagger(folder: Path, seed: int = 0) -> None:
    """spaCy's English pipeline as en_core_web_sm lays it out (a shared `tok2vec`, a `tagger` listening to it),
    narrow and trained on nothing: its tags are arbitrary, which the phonemiser takes like any other."""
    import numpy as np
    import spacy
    from spacy.training import Example

    nlp = spacy.blank("en")
    nlp.add_pipe("tok2vec", config={"model": {"@architectures": "spacy.HashEmbedCNN.v2", "width": 16, "depth": 1,
                                              "embed_size": 500, "window_size": 1, "maxout_pieces": 2,
                                              "subword_features": True, "pretrained_vectors": None}})  # fmt: skip
    nlp.add_pipe("tagger", config={"model": {"@architectures": "spacy.Tagger.v2", "tok2vec": {
        "@architectures": "spacy.Tok2VecListener.v1", "width": 16, "upstream": "tok2vec"}}})  # fmt: skip
    words = ["the", "cat", "sat", "on", "a", "mat", "."]
    examples = [Example.from_dict(nlp.make_doc(" ".join(words)), {"tags": TAGS[: len(words)]})]
    tagger = nlp.get_pipe("tagger")
    for tag in TAGS:
        tagger.add_label(tag)
    nlp.initialize(lambda: examples)
    # thinc drew the initial weights from numpy's global generator: each is drawn again from our own.
    rng = np.random.default_rng(seed)
    for _, component in nlp.pipeline:
        for node in component.model.walk():
            for name in node.param_names:
                if node.has_param(name):
                    value = node.get_param(name)
                    node.set_param(name, rng.normal(0.0, 0.1, value.shape).astype(value.dtype))
    nlp.meta.update(name="core_web_sm", version="3.8.0", lang="en")
    nlp.to_disk(folder)


def write_tiny_speech(root: str | Path, seed: int = 0) -> None:
    """`root/Kokoro-82M/` and `root/en_core_web_sm/`, tiny and random."""
    root = Path(root)
    write_tiny_kokoro(root / KOKORO_DIR_NAME, seed)
    write_tiny_tagger(root / TAGGER_DIR_NAME, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    write_tiny_speech(parser.parse_args().root)


if __name__ == "__main__":
    main()
