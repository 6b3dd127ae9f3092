"""Model zoo. Importing this package registers every built-in architecture."""

from kd_lightning.models import cifar_resnet, mnist  # noqa: F401  (registration side effects)
from kd_lightning.models.registry import (
    create_model,
    get_entry,
    list_models,
    register_model,
    register_prefix,
)

__all__ = ["create_model", "get_entry", "list_models", "register_model", "register_prefix"]
