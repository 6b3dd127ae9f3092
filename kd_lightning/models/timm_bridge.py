"""``timm:<name>``: any timm model by name — only when timm is installed (``pip install
'kd-lightning[timm]'``). Without timm the prefix stays registered and raises a ConfigError
that says how to install it.

Models are built with ``pretrained=False`` (runs never download), ``num_classes`` and
``in_chans`` set by timm itself; extra builder arguments pass through ``model_kwargs``.
Feature layers: the modules timm lists in ``model.feature_info`` (its own stage names, e.g.
``act1, layer1 … layer4`` for ResNets), then ``<classifier>.embedding`` for the pre-logit
embedding, as for the ``tv:`` bridge.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kd_lightning.errors import ConfigError, closest
from kd_lightning.models.registry import Builder, register_prefix
from kd_lightning.models.torchvision_bridge import attach_embedding


def _timm(name: str):
    try:
        import timm
    except ImportError:
        raise ConfigError(
            "model", f"timm:{name}",
            "timm is not installed: pip install 'kd-lightning[timm]' (or pip install timm), "
            "or use a registered model / a tv: torchvision model",
        ) from None
    return timm


def resolve(name: str) -> Builder:
    """The ``timm`` prefix resolver: check timm and the name now, build on demand."""
    timm = _timm(name)
    if not timm.is_model(name):
        raise ConfigError(
            "model", f"timm:{name}",
            f"timm has no model {name!r}. Closest: "
            f"{['timm:' + c for c in closest(name, timm.list_models())] or 'none'}",
        )

    def builder(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        if kwargs.pop("pretrained", False):
            raise ConfigError(
                "model_kwargs.pretrained", True,
                "timm: models are built untrained so that runs never download; save a trained "
                "state_dict and load it with teacher.weights",
            )
        model = timm.create_model(
            name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
        )
        stages = tuple(info["module"] for info in getattr(model, "feature_info", []) or [])
        classifier = next(
            (p for p, m in model.named_modules() if m is model.get_classifier()), None
        ) if hasattr(model, "get_classifier") else None
        embedding = attach_embedding(model, num_classes, classifier) if classifier else None
        model.feature_layers = (*stages, *([embedding] if embedding else []))
        return model

    builder.__doc__ = f"timm {name}, untrained."
    return builder


register_prefix("timm", resolve)
