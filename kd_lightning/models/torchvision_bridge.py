"""``tv:<name>``: any torchvision classification model, by name, built offline.

``model: tv:resnet18`` builds ``torchvision.models.get_model("resnet18", weights=None,
num_classes=...)``, untrained. ``model_kwargs: {weights: IMAGENET1K_V1}`` (any name of the
model's weights enum, or ``DEFAULT``) loads torchvision's pretrained weights from the torch hub
cache (``$TORCH_HOME/hub/checkpoints``): a run never downloads, so a cluster without internet
works once the file is copied there, and a missing file is a one-line error that says how to
fetch it. The first convolution is rebuilt when the data has a
different number of channels (e.g. 1 for MNIST), and extra builder arguments pass through
``model_kwargs`` (e.g. ``{image_size: 32}`` for ``tv:vit_b_16``).

Feature layers are derived from the module tree, because torchvision has no common API:

- the *stages*: the trunk's children (``features.*`` when the model has a ``features``
  Sequential, else its top-level children up to the pooling/classifier) that come just
  before each down-sampling child, plus the last one — e.g. ``relu, layer1 … layer4`` for
  ResNets and the pre-pooling ReLUs of each VGG block;
- the *pre-logit embedding*: ``<classifier>.embedding``, an ``nn.Identity`` that the final
  linear layer routes its input through (a forward pre-hook), so it can be hooked like any
  module while the state_dict keeps torchvision's names, e.g. ``fc.embedding`` for ResNets.

Any other path in ``named_modules()`` can be hooked too.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from kd_lightning.errors import ConfigError, closest
from kd_lightning.models.registry import Builder, register_prefix

#: top-level children that belong to the head, not the trunk
_HEAD_NAMES = frozenset({"avgpool", "fc", "classifier", "heads", "head", "dropout", "flatten"})
#: models whose auxiliary classifiers would turn the training output into a tuple
_AUX_LOGITS = frozenset({"googlenet", "inception_v3"})


def classification_models() -> list[str]:
    """Names of torchvision's classification builders (no detection/segmentation/video)."""
    from torchvision import models

    return sorted(models.list_models(module=models))


def resolve(name: str) -> Builder:
    """The ``tv`` prefix resolver: validate the name now, build on demand."""
    choices = classification_models()
    if name not in choices:
        raise ConfigError(
            "model", f"tv:{name}",
            f"torchvision has no classification model {name!r}. Closest: "
            f"{['tv:' + c for c in closest(name, choices)] or 'none'}; all names: "
            "torchvision.models.list_models(module=torchvision.models)",
        )

    def builder(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        return build(name, num_classes, in_channels, **kwargs)

    builder.__doc__ = f"torchvision {name}, untrained."
    return builder


def build(name: str, num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    from torchvision import models

    weights = kwargs.pop("weights", None)
    if name in _AUX_LOGITS:  # plain logits in training too, and no init-change warning
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    model = models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if weights is not None:
        load_pretrained(model, name, str(weights), num_classes, in_channels)
    adapt_input_channels(model, in_channels, f"tv:{name}")
    embedding = attach_embedding(model, num_classes)
    model.feature_layers = (*stage_outputs(model), *([embedding] if embedding else []))
    #: trained weights were loaded (an untrained teacher is refused, modules/teacher.py)
    model.kd_pretrained = weights is not None
    return model


def load_pretrained(model: nn.Module, name: str, weights: str, num_classes: int, in_channels: int) -> None:
    """torchvision's pretrained ``weights`` (an enum member name) for ``model``, read from
    the torch hub cache only."""
    import os

    import torch
    from torchvision import models

    enum = models.get_model_weights(name)
    if weights not in enum.__members__:
        raise ConfigError(
            "model_kwargs.weights", weights,
            f"tv:{name} has the weights {sorted(enum.__members__)}",
        )
    entry = enum[weights]
    classes = len(entry.meta.get("categories") or [])
    if classes and (classes != num_classes or in_channels != 3):
        raise ConfigError(
            "model_kwargs.weights", weights,
            f"they classify {classes} classes from RGB images, but the data has {num_classes} "
            f"classes and {in_channels} channel(s); use data with the same classes (ImageNet)",
        )
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(entry.url))
    if not os.path.isfile(path):
        raise ConfigError(
            "model_kwargs.weights", weights,
            f"{path} is missing and runs never download. On a machine with internet run "
            f"`python -c \"import torchvision; torchvision.models.get_weight('{type(entry).__name__}."
            f"{weights}').get_state_dict()\"` and copy the file there (or set TORCH_HOME)",
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(
            "model_kwargs.weights", path, f"the file does not fit tv:{name} ({str(err).splitlines()[0]})"
        ) from None


def adapt_input_channels(model: nn.Module, in_channels: int, label: str) -> None:
    """Rebuild the first convolution for ``in_channels`` inputs (fresh weights)."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            if module.groups != 1:
                raise ConfigError(
                    "model", label, f"its first conv ({path}) is grouped and cannot be "
                    f"rebuilt for {in_channels} input channels",
                )
            conv = nn.Conv2d(
                in_channels, module.out_channels, module.kernel_size, module.stride,
                module.padding, module.dilation, 1, module.bias is not None, module.padding_mode,
            )
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, attr, conv)
            return
    raise ConfigError("model", label, "it has no Conv2d whose input channels could be adapted")


def _stride(module: nn.Module) -> int:
    stride = getattr(module, "stride", 1)
    return max(stride) if isinstance(stride, tuple) else int(stride or 1)


def _downsamples(module: nn.Module) -> bool:
    pools_or_convs = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
    return any(isinstance(m, pools_or_convs) and _stride(m) > 1 for m in module.modules())


def stage_outputs(model: nn.Module) -> tuple[str, ...]:
    """The trunk children that end each resolution (see the module docstring)."""
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        trunk = [(f"features.{n}", m) for n, m in features.named_children()]
    else:
        trunk = [(n, m) for n, m in model.named_children() if n not in _HEAD_NAMES]
    if not trunk:
        return ()
    names = [prev for (prev, _), (_, cur) in zip(trunk, trunk[1:]) if _downsamples(cur)]
    names.append(trunk[-1][0])
    return tuple(dict.fromkeys(names))


def _through_embedding(module: nn.Module, args: tuple) -> tuple:
    # Module-level (not a lambda) so the model stays picklable and deep-copyable.
    return (module.embedding(args[0]), *args[1:])


def attach_embedding(model: nn.Module, num_classes: int, classifier: str | None = None) -> str | None:
    """Give the classifier an ``embedding`` Identity child that sees its input; return its path.

    ``classifier`` defaults to the last ``nn.Linear`` with ``num_classes`` outputs. Models
    without one (e.g. SqueezeNet's conv classifier) get no embedding entry.
    """
    if classifier is None:
        linears = [p for p, m in model.named_modules()
                   if isinstance(m, nn.Linear) and m.out_features == num_classes]
        if not linears:
            return None
        classifier = linears[-1]
    head = model.get_submodule(classifier)
    if not isinstance(head, nn.Linear):
        return None
    head.add_module("embedding", nn.Identity())
    head.register_forward_pre_hook(_through_embedding)
    return f"{classifier}.embedding"


register_prefix("tv", resolve)
