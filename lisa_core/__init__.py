"""LISA reasoning segmentation: the model, its checkpoints, generation and the inference pipeline.

The public names below are imported on first use, so `import lisa_core.errors` (or result) stays
light and does not load torch-heavy modules it does not need.
"""

from importlib import import_module

_EXPORTS = {
    "LisaConfig": "lisa_core.config",
    "LisaModel": "lisa_core.model",
    "LisaPipeline": "lisa_core.pipeline",
    "from_pretrained": "lisa_core.checkpoint",
    "save_pretrained": "lisa_core.checkpoint",
    "save_official_layout": "lisa_core.checkpoint",
    "save_tiny_checkpoint": "lisa_core.tiny",
    "SegmentationResult": "lisa_core.result",
    "SegmentRequest": "lisa_core.result",
    "Progress": "lisa_core.result",
    "Target": "lisa_core.result",
    "LisaError": "lisa_core.errors",
    "InputError": "lisa_core.errors",
    "CheckpointError": "lisa_core.errors",
    "ConfigurationError": "lisa_core.errors",
    "GenerationCancelled": "lisa_core.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lisa_core' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
