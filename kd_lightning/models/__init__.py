"""Model zoo. Importing this package registers every built-in architecture."""

# Registration side effects: every import below adds its models (or a name prefix).
from kd_lightning.models import (  # noqa: F401
    cifar_resnet,
    mnist,
    mobilenetv1,
    mobilenetv2,
    resnetv2,
    shufflenetv1,
    shufflenetv2,
    text,
    timm_bridge,
    torchvision_bridge,
    vgg,
    wrn,
)
from kd_lightning.models.registry import (
    create_model,
    get_entry,
    list_models,
    model_from_config,
    register_model,
    register_prefix,
)

__all__ = [
    "create_model",
    "get_entry",
    "list_models",
    "model_from_config",
    "register_model",
    "register_prefix",
]
