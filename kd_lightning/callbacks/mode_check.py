"""Fit-start checks that a module trains in the mode it should, with the teachers it should.

Lightning 2.x keeps every submodule's ``training`` flag as it finds it at fit start (it warns
"Found N module(s) in eval mode at the start of training" and carries on), so a network
loaded in eval mode — ``from_pretrained`` does that — trains without dropout and with frozen
BatchNorm statistics, and nothing fails. ``check_train_modes`` runs in
``BaseModule.on_train_start``, after Lightning's own mode handling and the sanity check:

* a trainable part (one holding a parameter that requires grad, and the dropout in it) in eval mode is
  switched to train mode, with one warning naming it: that is what training means, and
  Lightning's per-validation capture/restore keeps the corrected mode from then on;
* a frozen teacher in train mode is switched back to eval mode, with one warning;
* a teacher with no trained weights is refused (``ConfigError``) unless its spec set
  ``allow_untrained: true`` (``kd_lightning.modules.teacher.refuse_untrained``).
"""

from __future__ import annotations

import warnings

from torch import nn

from kd_lightning.modules.teacher import refuse_untrained


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(n or "<root>" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _should_train(module: nn.Module, name: str = "", parent: bool = True):
    """``(name, submodule)`` of every part of ``module`` that should be in train mode: one
    holding a parameter that requires grad, or a parameter-free one (dropout, activations)
    inside such a part. A wholly frozen part (parameters, none trainable) keeps its mode."""
    params = list(module.parameters())
    train = any(p.requires_grad for p in params) if params else parent
    if train:
        yield name, module
    for child_name, child in module.named_children():
        yield from _should_train(child, f"{name}.{child_name}" if name else child_name, train)


def check_train_modes(module: nn.Module) -> None:
    """Put every trainable part of ``module`` in train mode and every teacher (the
    ``teachers`` of a frozen-teacher module) in eval mode, warning once for each kind of fix;
    refuse an untrained teacher."""
    teachers: list[nn.Module] = list(getattr(module, "_teachers", None) or [])
    for teacher in teachers:
        refuse_untrained(teacher)
    in_eval = [name for name, sub in _should_train(module) if not sub.training]
    if in_eval:
        subs = dict(module.named_modules())
        for name in in_eval:
            nn.Module.train(subs[name], True)  # this module only: its frozen parts keep theirs
        warnings.warn(
            f"{len(in_eval)} trainable module(s) were in eval mode at the start of training "
            f"({_names(in_eval)}; e.g. loaded with from_pretrained): switched to train mode",
            stacklevel=2,
        )
    wrong = [i for i, t in enumerate(teachers) if any(m.training for m in t.modules())]
    if wrong:
        for i in wrong:
            for sub in teachers[i].modules():
                nn.Module.train(sub, False)
        warnings.warn(
            f"frozen teacher(s) {wrong} were in train mode: switched to eval mode", stacklevel=2
        )
