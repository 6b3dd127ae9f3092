"""Named-layer capture with forward hooks: the models are never rewritten."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kd_lightning.errors import ConfigError, closest
from kd_lightning.losses.outputs import ModelOutput


class FeatureTaps:
    """Run ``model`` and also return the outputs of the ``layers`` it names.

    Only the requested layers get hooks, so a logit-only run pays nothing.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], field: str) -> None:
        self.model = model
        self.layers = list(dict.fromkeys(layers))
        self.store: dict[str, Tensor] = {}
        modules = dict(model.named_modules())
        for name in self.layers:
            if name not in modules:
                label = getattr(model, "kd_name", type(model).__name__)
                stable = getattr(model, "feature_layers", ())
                raise ConfigError(
                    field,
                    name,
                    f"model {label!r} has no layer {name!r}. Closest: "
                    f"{closest(name, [n for n in modules if n]) or 'none'}. "
                    f"Documented feature layers: {list(stable) or 'see named_modules()'}",
                )
            modules[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self.store[name] = output

        return hook

    def __call__(self, x: Tensor) -> ModelOutput:
        if not self.layers:
            return ModelOutput(self.model(x))
        self.store = {}
        logits = self.model(x)
        features, self.store = self.store, {}
        return ModelOutput(logits, features)
