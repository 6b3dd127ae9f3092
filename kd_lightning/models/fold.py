"""BatchNorm folded into the convolution (or linear layer) before it, for frozen networks.

An eval-mode BatchNorm is an affine map per channel, so ``bn(conv(x))`` equals one
convolution with rescaled weights and a bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``);
a frozen teacher then skips one full pass over every feature map. The fold is done *in
place*: the convolution's weight and bias are replaced and the BatchNorm becomes an
``nn.Identity`` under the same name (timm's ``BatchNormAct2d``: its activation alone), so
every module path (feature taps, hooks) still exists and a tap on the BatchNorm's output
still sees the same tensor.

Which convolution feeds which BatchNorm is read from a ``torch.fx`` trace; where a model
cannot be traced (data-dependent control flow in some ``tv:``/``timm:``/``hf:`` models),
only the pairs that follow each other inside an ``nn.Sequential`` are folded. A pair is
left alone when a feature tap reads what folding changes (the convolution's output, the
BatchNorm's input), when either module runs more than once per forward, or when the
convolution's output also goes elsewhere. Every fold is then checked: the network's
outputs on a random batch must match the unfolded ones, or the folds are undone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

log = logging.getLogger(__name__)

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

#: folded outputs may differ from unfolded ones by fp32 rounding only; a wrong fold is off
#: by O(1), so this bound (relative to the largest output) separates the two with room
CHECK_RTOL = 1e-3


@dataclass
class FoldReport:
    """What ``fold_batchnorm`` did to one network."""

    folded: list[tuple[str, str]] = field(default_factory=list)  #: (conv/linear, bn) paths
    method: str = "none"  #: "fx", "sequential" (no trace), or "none"
    skipped: str | None = None  #: why nothing was folded, when there were BatchNorms


def fold_batchnorm(
    model: nn.Module,
    example_inputs: Sequence[Tensor] | None = None,
    keep: Iterable[str] = (),
) -> FoldReport:
    """Fold every eval-mode BatchNorm of ``model`` into the conv/linear layer before it.

    ``keep``: feature-tap names (``path`` or ``path:input``) whose values must not change.
    ``example_inputs``: inputs of the right shape and dtype; floating-point ones are
    replaced by seeded random values to check the folded network against the original.
    Never raises: a model that cannot be folded is left as it was, with the reason in the
    report (and logged).
    """
    report = FoldReport()
    if not any(isinstance(m, _BN) for m in model.modules()):
        return report
    if model.training:
        report.skipped = "the network is in train mode (BatchNorm uses batch statistics)"
        return _logged(model, report)
    protected_outputs, protected_inputs = set(), set()
    for name in keep:
        path, is_input = (
            (name[: -len(":input")], True) if name.endswith(":input") else (name, False)
        )
        (protected_inputs if is_input else protected_outputs).add(path)
    try:
        pairs, report.method = _pairs_from_trace(model), "fx"
    except Exception as err:  # noqa: BLE001 - any tracing failure: fall back, never fail a fit
        pairs, report.method = _pairs_from_sequentials(model), "sequential"
        log.debug(
            "fx could not trace %s (%s); folding nn.Sequential pairs only", _label(model), err
        )
    modules = dict(model.named_modules(remove_duplicate=False))
    counts: dict[int, int] = {}
    for m in modules.values():
        counts[id(m)] = counts.get(id(m), 0) + 1
    pairs = [
        (a, b)
        for a, b in pairs
        if a not in protected_outputs
        and b not in protected_inputs
        and counts[id(modules[a])] == 1
        and counts[id(modules[b])] == 1
        and _foldable(modules[a], modules[b])
    ]
    if not pairs:
        report.method = "none"
        report.skipped = (
            "no BatchNorm directly follows a convolution or linear layer it can fold into"
        )
        return _logged(model, report)

    inputs = _random_like(example_inputs) if example_inputs is not None else None
    reference = _outputs(model, inputs) if inputs is not None else None
    undo = [_fold_pair(model, modules, a, b) for a, b in pairs]
    if reference is not None:
        problem = _mismatch(reference, _outputs(model, inputs))
        if problem:
            for restore in reversed(undo):
                restore()
            report.method, report.skipped = (
                "none",
                f"folding changed the outputs ({problem}); undone",
            )
            return _logged(model, report)
    report.folded = pairs
    return _logged(model, report)


class _Tracer(torch.fx.Tracer):
    """Keeps every BatchNorm a leaf, subclasses too (timm's ``BatchNormAct2d``)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BN) or super().is_leaf_module(m, qualname)


class _AfterNorm(nn.Module):
    """What is left of timm's ``BatchNormAct2d`` once its normalisation is folded: its
    ``drop`` and ``act`` children, under the same names."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(x))


def _residue(bn: nn.Module) -> nn.Module | None:
    """The module that replaces a folded BatchNorm, or None for a kind we cannot fold."""
    if type(bn) in _BN:
        return nn.Identity()
    children = dict(bn.named_children())
    if type(bn).__name__ == "BatchNormAct2d" and set(children) == {"drop", "act"}:
        return _AfterNorm(children["drop"], children["act"])
    return None  # a subclass with a forward of its own: unknown


def _pairs_from_trace(model: nn.Module) -> list[tuple[str, str]]:
    graph = _Tracer().trace(model)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules.get(src.target), (*_CONV, nn.Linear))
            and len(src.users) == 1  # the conv's output feeds the BatchNorm and nothing else
            and calls[src.target] == 1
            and calls[node.target] == 1
        ):
            pairs.append((src.target, node.target))
    return pairs


def _pairs_from_sequentials(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (a, ma), (b, mb) in zip(children, children[1:]):
            if isinstance(ma, (*_CONV, nn.Linear)) and isinstance(mb, _BN):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a, prefix + b))
    return pairs


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    if _residue(bn) is None:
        return False
    if bn.training or bn.running_mean is None or bn.running_var is None:
        return False  # batch statistics: not an affine map
    if (
        layer._forward_hooks
        or layer._forward_pre_hooks
        or bn._forward_hooks
        or bn._forward_pre_hooks
    ):
        return False  # someone watches these modules' values
    if isinstance(layer, nn.Linear):
        return isinstance(bn, nn.BatchNorm1d) and layer.out_features == bn.num_features
    same_dims = _BN[_CONV.index(next(c for c in _CONV if isinstance(layer, c)))]
    return isinstance(bn, same_dims) and layer.out_channels == bn.num_features


def _fold_pair(model: nn.Module, modules: dict[str, nn.Module], a: str, b: str):
    """Fold bn ``b`` into layer ``a`` in place; returns the function that undoes it."""
    layer, bn = modules[a], modules[b]
    old_weight, old_bias = layer.weight, layer.bias
    fuse = fuse_linear_bn_weights if isinstance(layer, nn.Linear) else fuse_conv_bn_weights
    with torch.no_grad():
        weight, bias = fuse(
            layer.weight, layer.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    parent_name, _, child = b.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, child, _residue(bn))

    def undo() -> None:
        layer.weight, layer.bias = old_weight, old_bias
        setattr(parent, child, bn)

    return undo


def _random_like(inputs: Sequence[Tensor]) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)
        if x.is_floating_point()
        else x
        for x in inputs
    )


@torch.no_grad()
def _outputs(model: nn.Module, inputs: tuple[Tensor, ...]) -> list[Tensor]:
    out = model(*inputs)
    flat = (
        list(out.values())
        if isinstance(out, Mapping)
        else out
        if isinstance(out, (tuple, list))
        else [out]
    )
    return [t.detach().float() for t in flat if isinstance(t, Tensor)]


def _mismatch(ref: list[Tensor], new: list[Tensor]) -> str | None:
    if not ref:
        return "no tensor outputs to compare"
    if len(ref) != len(new):
        return "a different number of outputs"
    for r, n in zip(ref, new):
        scale = r.abs().max().item() if r.numel() else 0.0
        err = (r - n).abs().max().item() if r.numel() else 0.0
        if not err <= CHECK_RTOL * max(scale, 1e-6):
            return f"max abs difference {err:.3g} at output scale {scale:.3g}"
    return None


def _label(model: nn.Module) -> str:
    return getattr(model, "kd_name", type(model).__name__)


def _logged(model: nn.Module, report: FoldReport) -> FoldReport:
    if report.folded:
        log.info(
            "folded %d BatchNorm(s) of teacher %s (%s)",
            len(report.folded),
            _label(model),
            report.method,
        )
    elif report.skipped:
        log.info("teacher %s: BatchNorm not folded: %s", _label(model), report.skipped)
    return report
