"""Pre-training small models from scratch with and without attention sinks (paper Sec. 3.3).

:func:`pretrain` trains the variants of :data:`~streamingllm.train.recipe.VARIANTS` on the same
Austen text with the same tokenizer, schedule and seed (one novel held out), and saves each as an
ordinary transformers checkpoint that the rest of the library streams. Imports the core and
:mod:`streamingllm.evals.corpus` (for the text), never the command line or the server.
"""

from .data import austen_split, train_tokenizer, variant_tokenizer
from .loop import TrainResult, train_variant
from .recipe import PRESETS, VARIANTS, TrainConfig, Variant, build_model, variants_of
from .run import PretrainData, prepare_data, pretrain

__all__ = [
    "PRESETS", "VARIANTS", "PretrainData", "TrainConfig", "TrainResult", "Variant", "austen_split", "build_model",
    "prepare_data", "pretrain", "train_tokenizer", "train_variant", "variant_tokenizer", "variants_of",
]
