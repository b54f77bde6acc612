"""Image classifiers that take [0, 1] inputs, with normalisation inside the model."""

# Imported for their registration side effects.
from advmend.models import preact_resnet, resnet, small_cnn, vgg, wide_resnet  # noqa: F401, E402
from advmend.models.normalize import Normalize, describe_normalization
from advmend.models.registry import FSR_PRESETS, MODELS, create_model, fsr_preset

__all__ = ["MODELS", "FSR_PRESETS", "Normalize", "describe_normalization", "create_model", "fsr_preset"]
