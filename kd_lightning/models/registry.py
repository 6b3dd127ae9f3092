"""Name → builder registry, so configs address networks by string (timm style).

A builder takes ``num_classes`` plus what the data fixes about its inputs — ``in_channels``
for images, ``vocab_size`` and ``max_length`` for text — and returns an ``nn.Module`` whose
``feature_layers`` attribute lists the stable module paths feature heads may hook, and
whose ``input_keys`` (default ``("image",)``) name the batch keys its forward reads.
Names with a ``tv:`` or ``timm:`` prefix are resolved by the torchvision and timm bridges.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from kd_lightning.errors import ConfigError, closest

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Builder
    family: str
    input_size: int  # the spatial size the architecture was designed for


_REGISTRY: dict[str, ModelEntry] = {}
_PREFIX_RESOLVERS: dict[str, Callable[[str], Builder]] = {}


def register_model(
    name: str | None = None, *, family: str = "", input_size: int = 32
) -> Callable[[Builder], Builder]:
    """Decorator: ``@register_model("resnet20", family="cifar_resnet")``."""

    def wrap(fn: Builder) -> Builder:
        key = name or fn.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is registered twice")
        _REGISTRY[key] = ModelEntry(key, fn, family, input_size)
        return fn

    return wrap


def register_prefix(prefix: str, resolver: Callable[[str], Builder]) -> None:
    """Route names such as ``tv:resnet18`` to a resolver that returns a builder."""
    _PREFIX_RESOLVERS[prefix] = resolver


def list_models(family: str | None = None) -> list[str]:
    return sorted(k for k, e in _REGISTRY.items() if family is None or e.family == family)


def get_entry(name: str) -> ModelEntry:
    _ensure_loaded()
    if name in _REGISTRY:
        return _REGISTRY[name]
    raise ConfigError(
        "model",
        name,
        f"no model of that name is registered. Closest: {closest(name, _REGISTRY) or 'none'}. "
        "Use `kd_lightning.models.list_models()` for all names, or the prefixes "
        f"{sorted(p + ':' for p in _PREFIX_RESOLVERS)} for torchvision/timm models.",
    )


def create_model(
    name: str, num_classes: int = 10, in_channels: int | None = 3, field: str = "model", **kwargs
) -> nn.Module:
    """Build a registered model. ``field`` names the config key in error messages.

    ``in_channels=None`` for text models, which take ``vocab_size``/``max_length`` instead."""
    _ensure_loaded()
    prefix, _, rest = name.partition(":")
    try:  # resolver errors say "model"; re-raise them under the caller's config key
        if rest and prefix in _PREFIX_RESOLVERS:
            builder = _PREFIX_RESOLVERS[prefix](rest)
        else:
            builder = get_entry(name).builder
        if in_channels is not None:
            kwargs["in_channels"] = in_channels
        model = builder(num_classes=num_classes, **kwargs)
    except ConfigError as err:
        raise ConfigError(field, err.value, err.fix) from None
    except TypeError as err:
        raise ConfigError(f"{field}_kwargs", kwargs, f"{name} rejected them: {err}") from None
    model.kd_name = name  # remembered for error messages and reports
    return model


def model_from_config(
    name: str, num_classes: int, inputs: int | dict[str, Any], field: str, kwargs: dict | None
) -> nn.Module:
    """``create_model`` for a ``<field>`` + ``<field>_kwargs`` pair from a config.

    The data decides ``num_classes`` and ``inputs`` (``in_channels`` as an int or in a dict,
    or ``vocab_size``/``max_length`` for text; the CLI links them), so a second value in the
    kwargs is a mistake we name instead of a ``TypeError``.
    """
    inputs = {"in_channels": inputs} if isinstance(inputs, int) else dict(inputs)
    reserved = sorted(({"num_classes", "in_channels"} | set(inputs)) & set(kwargs or {}))
    if reserved:
        raise ConfigError(
            f"{field}_kwargs", kwargs, f"remove {reserved}: classes and input sizes come from the data"
        )
    in_channels = inputs.pop("in_channels", None)
    return create_model(name, num_classes, in_channels, field=field, **inputs, **(kwargs or {}))


def _ensure_loaded() -> None:
    # Importing the package registers every built-in model exactly once.
    import kd_lightning.models  # noqa: F401
