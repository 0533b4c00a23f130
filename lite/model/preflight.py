"""Every check of a checkpoint's files that needs no weight, run before any weight is read.

A checkpoint without a tokenizer used to load all its weights first (17 s, 11.9 GB RSS at full size) and only
then say so. Here the order is the cheap one: `config.json`, `preprocessor_config.json`, the tokenizer
files, then the safetensors index and every shard's header checked against the model's names and shapes
(on the weightless skeleton, so nothing heavy is imported). Each failure is one line naming the file.
"""

from __future__ import annotations

from pathlib import Path

from lite.model.checkpoint import CheckpointKind, checkpoint_kind
from lite.model.config import OvisU1Config, PreprocessorConfig, load_config, load_preprocessor_config
from lite.model.shards import index_checkpoint, validate_checkpoint
from lite.model.skeleton import skeleton_model
from lite.model.tokenizer import check_tokenizer_files


def check_checkpoint_files(directory: Path,
                           kind: CheckpointKind | None = None) -> tuple[OvisU1Config, PreprocessorConfig]:
    """(config, preprocessor config) once every file check passed; raises the first failure's one-line error.

    A pre-quantized checkpoint's shards are checked against its manifest by its own loader, which also
    reads nothing before that check; its configs and tokenizer are checked here like any other. `kind` is the
    caller's decision (`checkpoint_kind`), decided here when not given.
    """
    config = load_config(directory)
    pp = load_preprocessor_config(directory, config.vision)
    check_tokenizer_files(directory)
    if (kind or checkpoint_kind(directory)) is CheckpointKind.PLAIN:
        validate_checkpoint(skeleton_model(config), index_checkpoint(directory))
    return config, pp
