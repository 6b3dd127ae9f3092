"""Named-layer capture with forward hooks: the models are never rewritten.

A layer name is a module path (``layer3``, ``features.12``, ``blocks.3`` in a ``timm:``
model). With the suffix ``:input`` the tap captures what goes *into* the module instead
(a forward pre-hook): ``layer3.0.relu:input`` is the pre-activation output of a block whose
last op is that ReLU, which is what OFD's margin ReLU needs.

Pre-ReLU block outputs in the CIFAR zoo (each block ends ``relu(out + shortcut)`` with its
own ``relu`` module, which it also calls once earlier inside the block; the tap keeps the
*last* call, i.e. the block output before its final ReLU):

* ``resnet{8,14,20,...}``/``resnet8x4``/``resnet32x4``: ``layer{1,2,3}.{n-1}.relu:input``
  with ``n = (depth - 2) / 6`` blocks per stage (resnet8x4: ``layer3.0.relu:input``,
  resnet32x4: ``layer3.4.relu:input``); the stem: ``stem.2:input``.
* ``wrn_*``: pre-activation blocks; the stage outputs ``layer1``…``layer3`` are already
  pre-ReLU (the ReLU comes in the next block's ``bn1``/``relu``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from kd_lightning.errors import ConfigError, closest
from kd_lightning.losses.outputs import ModelOutput

#: suffix of a layer name that taps the module's input rather than its output
INPUT_SUFFIX = ":input"


def split_tap(name: str) -> tuple[str, bool]:
    """``"layer3.0.relu:input"`` → ``("layer3.0.relu", True)``; plain names → ``(name, False)``."""
    if name.endswith(INPUT_SUFFIX):
        return name[: -len(INPUT_SUFFIX)], True
    return name, False


class FeatureTaps:
    """Run ``model`` and also return the outputs (or, with ``:input``, inputs) of the
    ``layers`` it names.

    Only the requested layers get hooks, so a logit-only run pays nothing.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], field: str) -> None:
        self.model = model
        self.layers = list(dict.fromkeys(layers))
        self.store: dict[str, Tensor] = {}
        modules = dict(model.named_modules())
        for name in self.layers:
            path, is_input = split_tap(name)
            if path not in modules:
                label = getattr(model, "kd_name", type(model).__name__)
                stable = getattr(model, "feature_layers", ())
                raise ConfigError(
                    field,
                    name,
                    f"model {label!r} has no layer {path!r}. Closest: "
                    f"{closest(path, [n for n in modules if n]) or 'none'}. "
                    f"Documented feature layers: {list(stable) or 'see named_modules()'}"
                    f" (append {INPUT_SUFFIX} to tap a module's input)",
                )
            if is_input:
                modules[path].register_forward_pre_hook(self._pre_hook(name))
            else:
                modules[path].register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            self.store[name] = output

        return hook

    def _pre_hook(self, name: str):
        def hook(_module, inputs):
            # cloned: an in-place module (ReLU(inplace=True)) would otherwise overwrite the
            # captured pre-activation; the clone stays in the autograd graph
            self.store[name] = inputs[0].clone()

        return hook

    def __call__(self, *inputs: Tensor) -> ModelOutput:
        """``model(*inputs)``: one image tensor, or e.g. ``input_ids, attention_mask``."""
        if not self.layers:
            return ModelOutput(self.model(*inputs))
        self.store = {}
        logits = self.model(*inputs)
        features, self.store = self.store, {}
        return ModelOutput(logits, features)
