"""Initialise a student from its teacher's weights before distilling.

DistilBERT (Sanh et al. 2019, §3) starts its 6-layer student from every other layer of
the 12-layer BERT teacher, and reports that this initialisation matters. Two strategies:

``matching``
    copy every state-dict tensor (parameters *and* buffers such as BatchNorm running
    statistics) whose name and shape are the same in student and teacher. Useful when the
    student shares modules with the teacher (same stem, same width, fewer hidden layers).

``every_kth``
    for a shallower student of the same family: wherever both networks hold a stack of
    blocks (an ``nn.Sequential``/``nn.ModuleList`` of one block class, e.g. a CIFAR ResNet
    stage) and the student's stack is shorter, student block ``i`` takes teacher block
    ``i·k`` with ``k = teacher blocks // student blocks`` per stack (or a fixed ``k``).
    Block 0 — the one with the downsampling shortcut in a ResNet stage — thus maps to the
    teacher's block 0, which has the same shortcut. Everything outside block stacks is
    matched by name, as in ``matching``. ResNet-56 → ResNet-20 uses teacher blocks 0, 3, 6
    of each 9-block stage. For BERT students (the built-in ``bert`` and ``hf:`` models,
    which share one wrapper and hence module names) the stack is
    ``model.bert.encoder.layer``: a 6-layer student of a 12-layer teacher takes teacher
    layers 0, 2, …, 10, as DistilBERT did, and the embeddings, pooler and classifier are
    copied by name where their shapes match (a smaller position table is skipped and
    reported). The parameter-free feature taps (``hidden.{i}``, ``attention.{i}``) hold no
    tensors and are not remapped.

Either way the copy is reported (tensors and parameters copied, tensors skipped and why)
and a strategy that copies nothing is a configuration error, not a silent no-op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from kd_lightning.errors import ConfigError

InitStrategy = Literal["none", "matching", "every_kth"]
STRATEGIES: tuple[str, ...] = ("none", "matching", "every_kth")


@dataclass
class InitReport:
    """What ``copy_from_teacher`` did.

    Attributes:
        strategy: ``matching`` or ``every_kth``.
        copied: student tensor name → teacher tensor name it was copied from.
        skipped: student tensor name → why it kept its own initialisation.
        copied_params: number of parameter *elements* copied (buffers not counted).
        total_params: number of parameter elements in the student.
        block_map: student block path → teacher block path, for remapped stacks.
    """

    strategy: str
    copied: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    copied_params: int = 0
    total_params: int = 0
    block_map: dict[str, str] = field(default_factory=dict)

    @property
    def copied_tensors(self) -> int:
        return len(self.copied)

    @property
    def fraction(self) -> float:
        """Share of the student's parameter elements that now come from the teacher."""
        return self.copied_params / self.total_params if self.total_params else 0.0

    def summary(self, max_skipped: int = 8) -> str:
        lines = [
            f"init_from_teacher={self.strategy}: copied {self.copied_tensors} tensors, "
            f"{self.copied_params:,} of {self.total_params:,} parameters ({self.fraction:.1%}); "
            f"skipped {len(self.skipped)} tensors"
        ]
        if self.block_map:
            remapped = [f"{s}←{t}" for s, t in self.block_map.items() if s != t]
            if remapped:
                lines.append(f"  blocks remapped: {', '.join(remapped)}")
        for name, why in list(self.skipped.items())[:max_skipped]:
            lines.append(f"  skipped {name}: {why}")
        if len(self.skipped) > max_skipped:
            lines.append(f"  … and {len(self.skipped) - max_skipped} more skipped")
        return "\n".join(lines)


def copy_from_teacher(
    student: nn.Module,
    teacher: nn.Module,
    strategy: str = "matching",
    k: int | None = None,
    field_name: str = "model.init_from_teacher",
    verbose: bool = True,
) -> InitReport:
    """Copy ``teacher`` weights into ``student`` in place and report what was copied.

    Args:
        student, teacher: the two networks (the teacher is only read).
        strategy: ``matching`` or ``every_kth`` (see the module docstring).
        k: fixed stride for ``every_kth``; default: ``teacher blocks // student blocks``
            per stack.
        field_name: the config key named in errors.
        verbose: print the summary (rank zero only).

    Raises:
        ConfigError: unknown strategy, bad ``k``, or nothing at all could be copied.
    """
    if strategy not in ("matching", "every_kth"):
        raise ConfigError(field_name, strategy, f"use one of {list(STRATEGIES)}")
    if k is not None and k < 1:
        raise ConfigError("copy_from_teacher.k", k, "use a stride k >= 1, or leave it unset")

    pairs: dict[str, str] = {}  # student module path → teacher module path
    block_map: dict[str, str] = {}
    _pair_modules(student, teacher, "", "", strategy == "every_kth", k, pairs, block_map)

    report = InitReport(strategy, block_map=block_map)
    param_names = {n for n, _ in student.named_parameters()}
    report.total_params = sum(p.numel() for p in student.parameters())
    t_state = teacher.state_dict()
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            module_path, _, attr = name.rpartition(".")
            if module_path not in pairs:
                report.skipped[name] = "no counterpart module in the teacher"
                continue
            t_name = f"{pairs[module_path]}.{attr}" if pairs[module_path] else attr
            source = t_state.get(t_name)
            if source is None:
                report.skipped[name] = f"the teacher has no tensor {t_name!r}"
            elif source.shape != tensor.shape:
                report.skipped[name] = (
                    f"shape {tuple(tensor.shape)} ≠ teacher {t_name} {tuple(source.shape)}"
                )
            else:
                # state_dict() tensors share storage with the live parameters/buffers
                tensor.copy_(source.to(tensor.device, tensor.dtype))
                report.copied[name] = t_name
                if name in param_names:
                    report.copied_params += tensor.numel()

    if not report.copied:
        s_name = getattr(student, "kd_name", type(student).__name__)
        t_name = getattr(teacher, "kd_name", type(teacher).__name__)
        raise ConfigError(
            field_name, strategy,
            f"no tensor of the student {s_name!r} matches the teacher {t_name!r} by name and "
            "shape; use a student of the teacher's family with the same widths, or 'none'",
        )
    if verbose:
        rank_zero_info(report.summary())
    return report


def _pair_modules(
    s: nn.Module, t: nn.Module, s_path: str, t_path: str, remap: bool, k: int | None,
    pairs: dict[str, str], block_map: dict[str, str],
) -> None:
    """Walk both module trees together, recording which teacher module feeds each student one."""
    pairs[s_path] = t_path
    if remap and _is_block_stack(s) and _is_block_stack(t) and len(s) < len(t):
        stride = k if k is not None else len(t) // len(s)
        if stride * (len(s) - 1) >= len(t):
            raise ConfigError(
                "copy_from_teacher.k", k,
                f"{s_path or 'the model'} has {len(s)} student blocks but the teacher only "
                f"{len(t)}: use k <= {(len(t) - 1) // max(len(s) - 1, 1)}",
            )
        for i in range(len(s)):
            s_child, t_child = _join(s_path, str(i)), _join(t_path, str(i * stride))
            block_map[s_child] = t_child
            _pair_modules(s[i], t[i * stride], s_child, t_child, remap, k, pairs, block_map)
        return
    t_children = dict(t.named_children())
    for name, s_child in s.named_children():
        if name in t_children:
            _pair_modules(
                s_child, t_children[name], _join(s_path, name), _join(t_path, name),
                remap, k, pairs, block_map,
            )


def _is_block_stack(m: nn.Module) -> bool:
    """A Sequential/ModuleList of blocks of one class (a ResNet stage, a transformer stack)."""
    if not isinstance(m, (nn.Sequential, nn.ModuleList)) or len(m) == 0:
        return False
    kinds = {type(c) for c in m}
    return len(kinds) == 1 and any(True for _ in m[0].parameters())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
