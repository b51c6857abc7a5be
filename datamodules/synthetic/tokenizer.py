"""The caption tokenizer of the synthetic world: open_clip's BPE over the world's vocabulary."""

from __future__ import annotations

from datamodules.synthetic.text import VOCABULARY
from lightning_vigu.text import OpenCLIPTokenizer


class WorldTokenizer(OpenCLIPTokenizer):
    """open_clip's BPE tokenization restricted to the words the world's templates use.

    The caption head then predicts over ~100 ids instead of 49,408; select it in a config with
    ``model.tokenizer: {class_path: datamodules.synthetic.WorldTokenizer}``.
    """

    def __init__(self) -> None:
        super().__init__(vocabulary=list(VOCABULARY))
