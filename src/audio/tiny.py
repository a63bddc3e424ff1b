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
from pathlib import Path


from .kokoro_layout import KOKORO_DIR_NAME, TAGGER_DIR_NAME, kokoro_config, write_kokoro

# Penn Treebank tags, the labels of en_core_web_sm's tagger (misaki reads `token.tag_`).
TAGS = (
    "$ '' , -LRB- -RRB- . : ADD AFX CC CD DT EX FW HYPH IN JJ JJR JJS LS MD NFP NN NNP NNPS NNS PDT POS PRP PRP$ RB RBR "
    "RBS RP SYM TO UH VB VBD VBG VBN VBP VBZ WDT WP WP$ WRB XX _SP ``"
).split()


def english_and_mandarin_symbols() -> list[str]:
    """What misaki's English and Mandarin phonemisers write: the tiny model's vocabulary."""
    from misaki import en

    mandarin = set("↓→↗↘ɨꭧʰʂʐɻʨʦɕʈɤɥ")  # beyond the English symbols: tones, retroflexes
    return sorted(en.US_VOCAB | en.GB_VOCAB | mandarin | set(';:,.!?—…"()“” '))


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
    write_kokoro(root / KOKORO_DIR_NAME, kokoro_config(english_and_mandarin_symbols()), seed)
    write_tiny_tagger(root / TAGGER_DIR_NAME, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    write_tiny_speech(parser.parse_args().root)


if __name__ == "__main__":
    main()
