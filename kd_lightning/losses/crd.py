"""Tian et al. 2020, "Contrastive Representation Distillation" (ICLR), as in RepDistiller."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.base import Batch
from kd_lightning.losses.feature import FeatureHead
from kd_lightning.losses.outputs import ModelOutput, TeacherOutput


def nce_loss(scores: Tensor, num_samples: int, eps: float = 1e-7) -> Tensor:
    """CRD's NCE objective (paper Eq. 18) on ``scores`` (B, 1 + K): column 0 is the positive.

    Each score is treated as unnormalised p(data | pair); the noise distribution is
    uniform over the ``num_samples`` bank entries, so ``Pn = 1 / num_samples``.
    """
    k = scores.shape[1] - 1
    noise = k / num_samples
    log_pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    log_neg = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / scores.shape[0]


def _gather(x: Tensor) -> Tensor:
    """Concatenate ``x`` over all processes (identity on one device), without gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class CRD(FeatureHead):
    """Contrastive representation distillation with a momentum memory bank.

    Both embeddings are projected by a learnable linear layer to ``feat_dim`` and
    L2-normalised. For each sample, its teacher embedding must score higher against
    the student's own bank entry than against ``nce_k`` random entries, and vice versa
    (two NCE terms, anchored on each network). The banks hold one embedding per
    training sample, keyed by ``batch["index"]``, updated with ``momentum``; they are
    buffers, so they are saved in the checkpoint. Both projections are head-side
    trainable modules: the teacher network itself never receives gradients.

    Negatives are drawn uniformly from the bank (RepDistiller's CIFAR-100 "exact" mode
    instead draws them from other classes; with 100 classes 1% of uniform draws share
    the class). Under DDP the bank updates are gathered from every process and Z is
    averaged over them, so all copies stay identical without DDP broadcasting the banks.

    Args:
        weight: RepDistiller uses 0.8 on CIFAR-100 (with CE, with or without KD).
        student_layers, teacher_layers: one pair, usually the pre-logit embeddings
            (``features`` on MNIST models, ``pool`` on CIFAR ResNets).
        num_samples: bank size: the number of samples in the training split's *source*
            array (50000 for CIFAR-10/100: ``index`` counts positions in the official
            train split). ``None`` sizes the bank from the largest index seen, growing
            it as needed (single device only).
        feat_dim: embedding size (128).
        nce_k: negatives per sample (16384).
        nce_t: softmax temperature of the scores (0.07).
        momentum: bank update momentum (0.5).
    """

    reference = (
        "HobbitLong/RepDistiller@b84f547c5db6a35318d4671d7d5c4de74c822403 "
        "crd/criterion.py L31-L102, crd/memory.py L10-L79"
    )
    departures = (
        "negatives are drawn uniformly from the bank, where RepDistiller's CIFAR-100 "
        "loader can draw them from other classes only (its 'exact' mode)",
    )
    default_name = "crd"
    single_pair = True
    # every process applies the same gathered updates and the same all-reduced Z, so DDP's
    # per-step broadcast of the banks (2·N·feat_dim floats: 51 MB on CIFAR) is pure waste
    rank_consistent_buffers = ("memory_s", "memory_t", "z")

    def __init__(
        self,
        weight: float = 0.8,
        *,
        num_samples: int | None = None,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(weight, **kwargs)
        checks = (
            ("num_samples", num_samples, num_samples is None or num_samples >= 1,
             "use the training split's size (e.g. 50000 for CIFAR), or leave it unset"),
            ("feat_dim", feat_dim, feat_dim >= 1, "use an embedding size >= 1 (e.g. 128)"),
            ("nce_k", nce_k, nce_k >= 1, "use at least one negative (paper: 16384)"),
            ("nce_t", nce_t, nce_t > 0, "use a temperature > 0 (paper: 0.07)"),
            ("momentum", momentum, 0.0 <= momentum < 1.0, "use a momentum in [0, 1) (paper: 0.5)"),
        )
        for field, value, ok, fix in checks:
            if not ok:
                raise ConfigError(f"CRD.{field}", value, fix)
        self.num_samples = num_samples
        self.feat_dim, self.nce_k = int(feat_dim), int(nce_k)
        self.nce_t, self.momentum = float(nce_t), float(momentum)
        self.embed_s: nn.Module = nn.Identity()
        self.embed_t: nn.Module = nn.Identity()
        self.register_buffer("memory_s", self._random_rows(num_samples or 0))
        self.register_buffer("memory_t", self._random_rows(num_samples or 0))
        # per-direction normalising constants Z, estimated once from the first batch
        self.register_buffer("z", torch.full((2,), -1.0))

    def _random_rows(self, n: int, device: torch.device | None = None) -> Tensor:
        """RepDistiller's bank initialisation: uniform in ±1/sqrt(feat_dim / 3)."""
        std = 1.0 / math.sqrt(self.feat_dim / 3)
        return torch.rand(n, self.feat_dim, device=device).mul_(2 * std).sub_(std)

    def build_pairs(self, shapes: list[tuple[torch.Size, torch.Size]]) -> None:
        (s_shape, t_shape), = shapes
        self.embed_s = nn.Linear(math.prod(s_shape[1:]), self.feat_dim)
        self.embed_t = nn.Linear(math.prod(t_shape[1:]), self.feat_dim)

    @property
    def bank_size(self) -> int:
        return self.memory_s.shape[0]

    # -- the bank ------------------------------------------------------------------------
    def _ensure_capacity(self, index: Tensor) -> None:
        top = int(index.max()) + 1
        if top <= self.bank_size:
            return
        if self.num_samples is not None:
            raise ConfigError(
                "CRD.num_samples", self.num_samples,
                f"the data yields sample index {top - 1}; use at least {top} (the size of the "
                "training split's source array) or leave num_samples unset",
            )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ConfigError(
                "CRD.num_samples", None,
                "set num_samples when training on several devices: a bank that grows on the "
                "fly could differ in size between processes",
            )
        extra = top - self.bank_size
        dev = self.memory_s.device
        self.memory_s = torch.cat([self.memory_s, self._random_rows(extra, dev)])
        self.memory_t = torch.cat([self.memory_t, self._random_rows(extra, dev)])

    @torch.no_grad()
    def _update(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            rows = bank.index_select(0, index) * self.momentum + v * (1 - self.momentum)
            bank.index_copy_(0, index, F.normalize(rows, dim=1))

    def _load_from_state_dict(
        self, state_dict: dict[str, Tensor], prefix: str, *args: object, **kwargs: object
    ) -> None:
        # A lazily sized bank is empty in a fresh head: adopt the saved size on load.
        if self.num_samples is None:
            for key in ("memory_s", "memory_t"):
                saved = state_dict.get(prefix + key)
                if saved is not None and saved.shape != getattr(self, key).shape:
                    setattr(self, key, torch.empty_like(saved, device=getattr(self, key).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the loss ------------------------------------------------------------------------
    def _scores(self, bank: Tensor, anchor: Tensor, rows: Tensor) -> Tensor:
        """``exp(<bank[rows[b, j]], anchor[b]> / τ)``, shape (B, 1 + K)."""
        n, d = bank.shape
        if n <= rows.shape[1] * d:
            # One GEMM against the whole bank, then pick the rows: its (B, N) result is no
            # larger than the (B, 1 + K, D) gathered rows whenever N ≤ (1 + K)·D (CIFAR:
            # 50k ≤ 2.1M), and a GEMM is far faster than a batched matrix-vector product.
            # The snapshot (N·D floats) is what backward reads: the bank is updated in place.
            dots = (anchor @ bank.clone().t()).gather(1, rows)
        else:
            dots = torch.bmm(bank[rows], anchor[:, :, None]).squeeze(2)
        return torch.exp(dots / self.nce_t)

    def contrast(self, v_s: Tensor, v_t: Tensor, index: Tensor, negatives: Tensor) -> Tensor:
        """Both NCE terms for embeddings ``v_s``/``v_t`` (B, D), positives ``index`` (B,)
        and bank rows ``negatives`` (B, K)."""
        rows = torch.cat([index[:, None], negatives], dim=1)  # (B, 1 + K), positive first
        score_s = self._scores(self.memory_t, v_s, rows)  # student anchors vs the teacher bank
        score_t = self._scores(self.memory_s, v_t, rows)  # teacher anchors vs the student bank
        if self.z[0] < 0:  # Z ≈ N·E[exp(s/τ)] makes the scores roughly normalised
            means = torch.stack([score_s.mean(), score_t.mean()]).detach()
            self.z.copy_(_gather(means[None]).mean(0) * self.bank_size)  # the same on every rank
        n = self.bank_size
        return nce_loss(score_s / self.z[0], n) + nce_loss(score_t / self.z[1], n)

    def forward(self, student: ModelOutput, teacher: TeacherOutput, batch: Batch) -> Tensor:
        if "index" not in batch:
            raise ConfigError(
                "data", sorted(batch), "CRD keys its memory bank by batch['index']: use a "
                "kd_lightning DataModule (its batches carry 'index')",
            )
        if isinstance(self.embed_s, nn.Identity):
            raise RuntimeError("CRD.build() must run first: the DistillationModule calls it")
        (f_s, f_t), = self.pairs(student, teacher)
        index = batch["index"].long()
        v_s = F.normalize(self.embed_s(f_s.flatten(1)), dim=1)
        v_t = F.normalize(self.embed_t(f_t.flatten(1)), dim=1)
        all_index = _gather(index)
        self._ensure_capacity(all_index)
        negatives = torch.randint(0, self.bank_size, (len(index), self.nce_k), device=index.device)
        loss = self.contrast(v_s, v_t, index, negatives)
        if self.training:
            self._update(all_index, _gather(v_s.detach()), _gather(v_t.detach()))
        return loss

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, bank={self.bank_size}, feat_dim={self.feat_dim}, "
            f"nce_k={self.nce_k}, nce_t={self.nce_t}"
        )
