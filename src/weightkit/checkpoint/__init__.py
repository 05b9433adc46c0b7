"""Checkpoints on disk: lazy safetensors reading and atomic, sharded safetensors writing.

:class:`CheckpointReader` opens a Hugging Face model directory or a single file, validates every header,
and reads one tensor at a time; :class:`CheckpointWriter` streams tensors into shards inside a hidden
temporary directory and renames it into place only when complete.
"""

from weightkit.checkpoint.files import weights_size
from weightkit.checkpoint.manifest import Provenance
from weightkit.checkpoint.reader import CheckpointReader
from weightkit.checkpoint.writer import CheckpointWriter, ModelCard

__all__ = ["CheckpointReader", "CheckpointWriter", "ModelCard", "Provenance", "weights_size"]
