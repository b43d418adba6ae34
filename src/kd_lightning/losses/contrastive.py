"""Contrastive Representation Distillation (Tian, Krishnan, Isola; ICLR 2020; arXiv 1910.10699), pure torch.

CRD maximises a lower bound on the mutual information between student and teacher representations with a
noise-contrastive estimation (NCE) objective. Each training sample ``i`` has a row in two memory banks of
L2-normalised embeddings, one of student embeddings and one of teacher embeddings. The student embedding
of ``i`` is contrasted with the teacher bank: its positive is row ``i``, its ``K`` negatives are rows of other
samples. The teacher embedding of ``i`` is contrasted with the student bank in the same way. Then the banks'
rows of the batch move towards the new embeddings by momentum.

With ``h(v, m) = exp(v·m / τ) / Z`` for an embedding ``v`` and a bank row ``m``, and ``c = K / N`` (``K``
negatives drawn from ``N`` samples, so the noise density is ``1/N``), the loss of one side is

    L = −(1/B) Σ_i [ log(h_i⁺ / (h_i⁺ + c)) + Σ_k log(c / (h_ik⁻ + c)) ]

and CRD's term is the sum of both sides. ``Z`` is estimated once, on the first batch, as
``N · mean(exp(v·m/τ))`` over all of that batch's scores. After the scores are computed, each row of the
batch's indices is updated: ``m_i ← normalise(μ·m_i + (1 − μ)·v_i)``.

Reference behaviour: HobbitLong/RepDistiller ``crd/criterion.py`` and ``crd/memory.py`` and its
``CIFAR100InstanceSample``. This module reimplements that behaviour with these differences:

- The NCE terms are computed in log space with ``softplus``. The official code evaluates
  ``log(P / (P + c + 1e-7))``. The two agree to within about 1e-7 relative error, and the log-space form
  cannot overflow at small τ. ``Z`` is stored as ``log Z``.
- Scores come from one product ``v @ bankᵀ`` followed by a gather of the ``K + 1`` sampled columns. The
  official code gathers ``[B, K+1, dim]`` bank rows, which is the same value but uses far more memory
  (``B·(K+1)·dim`` floats against ``B·N`` here, plus one ``N·dim`` copy of each bank per step).
- Under DDP, :meth:`ContrastiveMemory.update_` gathers the indices and embeddings of every rank, so all ranks
  apply the same update and their banks stay identical. The banks are broadcast from rank 0 on first use,
  and ``Z`` is estimated from the first batches of all ranks. The official code is single-process.
- When one update contains an index more than once, the last occurrence wins. The official
  ``index_copy_`` leaves this undefined on CUDA. Under DDP it happens when the sampler pads the last batch.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError
from kd_lightning.losses.terms import weighted_terms

__all__ = ["CRDLoss", "ContrastiveMemory", "EmbedHead", "all_gather_cat", "nce_loss"]

Sampling = Literal["exact", "instance", "uniform"]
SAMPLING_MODES: tuple[str, ...] = ("exact", "instance", "uniform")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_cat(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Concatenate each tensor along dim 0 over all ranks, in rank order. Sizes along dim 0 may differ.

    Returns the tensors unchanged when no process group with more than one rank is initialised.
    The tensors of one call share their first dimension (one row per item). Every rank must call it
    with the same number of tensors, and tensors ``i`` of all ranks must match in every dimension but
    the first. The result carries no gradient.
    """
    if len({t.shape[0] for t in tensors}) > 1:
        raise KDConfigError(f"all_gather_cat: the tensors must share dim 0, got {[tuple(t.shape) for t in tensors]}.")
    if not _distributed():
        return tensors
    world = dist.get_world_size()
    device = tensors[0].device
    size = torch.tensor([tensors[0].shape[0]], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    out = []
    for t in tensors:
        padded = t.new_zeros((longest, *t.shape[1:]))
        padded[: t.shape[0]] = t.detach()
        chunks = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(chunks, padded.contiguous())
        out.append(torch.cat([chunk[:n] for chunk, n in zip(chunks, counts)]))
    return tuple(out)


def nce_loss(logits: Tensor, log_z: Tensor | float, num_samples: int) -> Tensor:
    """One side of CRD's NCE loss (RepDistiller's ``ContrastLoss``, Eq. 18 of the paper), batch mean.

    Args:
        logits: ``[B, K+1]`` scores ``v·m / τ``; column 0 is the positive, columns 1.. are the ``K`` negatives.
        log_z: ``log Z``, the log normalisation constant, so that ``h = exp(logits − log Z)``.
        num_samples: ``N``, the size of the memory bank. The noise density is ``1/N``.

    Returns:
        ``−(1/B) Σ_i [log(h_i0 / (h_i0 + K/N)) + Σ_{k≥1} log((K/N) / (h_ik + K/N))]``, computed as
        ``softplus`` terms in float32 or higher.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise KDConfigError(f"logits must be [batch, 1 + K] with K >= 1 negatives, got {tuple(logits.shape)}.")
    if num_samples < 1:
        raise KDConfigError(f"num_samples must be >= 1, got {num_samples}.")
    k = logits.shape[1] - 1
    log_noise = math.log(k / num_samples)  # log(K · P_n), P_n = 1/N
    log_h = (logits.double() if logits.dtype == torch.float64 else logits.float()) - log_z
    positive = F.softplus(log_noise - log_h[:, 0])  # −log(h / (h + c))
    negative = F.softplus(log_h[:, 1:] - log_noise).sum(dim=1)  # −log(c / (h + c))
    return (positive + negative).mean()


class EmbedHead(nn.Module):
    """CRD's embedding head: flatten, ``Linear(in_features, dim)``, L2-normalise (output in float32)."""

    def __init__(self, in_features: int, dim: int = 128) -> None:
        super().__init__()
        if in_features < 1 or dim < 1:
            raise KDConfigError(f"EmbedHead needs in_features >= 1 and dim >= 1, got {in_features} and {dim}.")
        self.linear = nn.Linear(in_features, dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)).float(), dim=1)


def _last_occurrence(index: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct values of ``index`` and, for each, the position of its last occurrence."""
    unique, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(index.numel(), device=index.device)
    last = torch.full((unique.numel(),), -1, dtype=torch.long, device=index.device)
    last = last.scatter_reduce(0, inverse, positions, reduce="amax")
    return unique, last


class ContrastiveMemory(nn.Module):
    """CRD's two memory banks: one row per training sample, for student embeddings and for teacher embeddings.

    Rows start uniform in ``[−a, a]`` with ``a = 1/sqrt(dim/3)``, so that ``E‖row‖² = 1``, as in the official
    code. Each update sets ``row_i ← normalise(μ·row_i + (1 − μ)·v_i)``. Both banks, and ``labels`` when it is
    given, are persistent buffers.

    Args:
        num_samples: ``N``, the number of rows: the size of the training set's index space.
        dim: embedding dimension.
        momentum: ``μ``, the weight kept by the old row, in ``[0, 1)``. 0.5 in the paper.
        labels: ``[N]`` class of every sample. Needed by ``"exact"`` sampling, which draws negatives from
            other classes.

    Under ``torch.distributed`` (any backend), :meth:`update_` gathers the batch of every rank before
    updating, and the banks are broadcast from rank 0 on first use, so every rank keeps identical banks.
    Call it on every rank at each step.
    """

    student_bank: Tensor
    teacher_bank: Tensor
    labels: Tensor

    def __init__(self, num_samples: int, dim: int, momentum: float = 0.5, labels: Tensor | None = None) -> None:
        super().__init__()
        if num_samples < 2:
            raise KDConfigError(
                f"ContrastiveMemory needs num_samples >= 2 (a positive and a negative), got {num_samples}."
            )
        if dim < 1:
            raise KDConfigError(f"ContrastiveMemory needs dim >= 1, got {dim}.")
        if not 0.0 <= momentum < 1.0:
            raise KDConfigError(f"momentum must be in [0, 1), got {momentum}.")
        self.momentum = momentum
        bound = 1.0 / math.sqrt(dim / 3.0)
        self.register_buffer("student_bank", torch.rand(num_samples, dim).mul_(2 * bound).sub_(bound))
        self.register_buffer("teacher_bank", torch.rand(num_samples, dim).mul_(2 * bound).sub_(bound))
        if labels is not None:
            labels = torch.as_tensor(labels).long().flatten()
            if labels.numel() != num_samples:
                raise KDConfigError(f"labels must hold one class per sample ({num_samples}), got {labels.numel()}.")
            self.register_buffer("labels", labels.clone())
        self._synced = False
        self._min_negatives: int | None = None

    @property
    def num_samples(self) -> int:
        return self.student_bank.shape[0]

    @property
    def dim(self) -> int:
        return self.student_bank.shape[1]

    @property
    def has_labels(self) -> bool:
        return "labels" in self._buffers

    def min_negatives(self) -> int:
        """Other-class samples left by the largest class: the most "exact" negatives drawable without replacement."""
        if self._min_negatives is None:
            if not self.has_labels:
                return self.num_samples - 1
            self._min_negatives = self.num_samples - int(torch.bincount(self.labels).max())
        return self._min_negatives

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._min_negatives = None  # labels may have changed

    # ------------------------------------------------------------------ sampling
    def sample(
        self, index: Tensor, num_negatives: int, mode: Sampling = "exact", generator: torch.Generator | None = None
    ) -> Tensor:
        """Contrast indices ``[B, 1 + K]``: column 0 is ``index`` (the positive), columns 1.. the negatives.

        Modes:
            ``"exact"``: RepDistiller's ``mode='exact'``. The negatives are ``K`` distinct samples of classes
                other than the anchor's. They are drawn with replacement only when fewer than ``K`` exist.
                Needs ``labels``.
            ``"instance"``: uniform over the other ``N − 1`` samples of any class, with replacement. Never
                draws the positive.
            ``"uniform"``: uniform over all ``N`` samples, with replacement. It may draw the positive or
                same-class samples. This is the cheapest mode, and what the official memory draws when it is
                given no contrast indices.
        """
        index = index.reshape(-1).long()
        n, k, device = self.num_samples, int(num_negatives), index.device
        if not 1 <= k <= n - 1:
            raise KDConfigError(f"num_negatives must be in [1, N - 1 = {n - 1}], got {k}.")
        batch = index.numel()
        if mode == "uniform":
            negatives = torch.randint(0, n, (batch, k), device=device, generator=generator)
        elif mode == "instance":
            negatives = torch.randint(0, n - 1, (batch, k), device=device, generator=generator)
            negatives = negatives + (negatives >= index[:, None]).long()  # skip the positive
        elif mode == "exact":
            if not self.has_labels:
                raise KDConfigError(
                    "sampling='exact' draws negatives from other classes and needs the memory's labels."
                )
            labels = self.labels.to(device)
            same = labels[index][:, None] == labels[None, :]  # [B, N]
            keys = torch.rand(batch, n, device=device, generator=generator).masked_fill_(same, 2.0)
            negatives = keys.topk(k, dim=1, largest=False, sorted=False).indices  # random K-subset of other classes
            if k > self.min_negatives():  # some classes leave fewer than K: draw those rows with replacement
                others = (~same).float()
                available = others.sum(dim=1)
                if bool((available == 0).any()):
                    raise KDConfigError("sampling='exact' needs samples of at least two classes in the memory.")
                short = available < k
                if bool(short.any()):
                    negatives[short] = torch.multinomial(others[short], k, replacement=True, generator=generator)
        else:
            raise KDConfigError(f"sampling must be one of {SAMPLING_MODES}, got {mode!r}.")
        return torch.cat([index[:, None], negatives], dim=1)

    # ------------------------------------------------------------------ updates
    @torch.no_grad()
    def synchronize_(self, src: int = 0) -> None:
        """Broadcast both banks from rank ``src``. This runs once, on first use under ``torch.distributed``."""
        if _distributed():
            for bank in (self.student_bank, self.teacher_bank):
                dist.broadcast(bank, src=src)
            self._synced = True

    def _ensure_synced(self) -> None:
        if not self._synced and _distributed():
            self.synchronize_()

    @torch.no_grad()
    def update_(self, index: Tensor, student_embedding: Tensor, teacher_embedding: Tensor, sync: bool = True) -> None:
        """Momentum update of the batch's rows of both banks.

        Args:
            index: ``[B]`` dataset indices of the batch.
            student_embedding, teacher_embedding: ``[B, dim]`` L2-normalised embeddings; they are detached.
            sync: under ``torch.distributed``, gather the indices and embeddings of every rank first, so that
                every rank applies the same update. Every rank must then call this method.
        """
        index = index.reshape(-1).long()
        if student_embedding.shape != (index.numel(), self.dim) or teacher_embedding.shape != student_embedding.shape:
            raise KDConfigError(
                f"embeddings must be [B={index.numel()}, dim={self.dim}], got {tuple(student_embedding.shape)} and "
                f"{tuple(teacher_embedding.shape)}."
            )
        s = student_embedding.detach().to(self.student_bank.dtype)
        t = teacher_embedding.detach().to(self.teacher_bank.dtype)
        if sync:
            self._ensure_synced()
            index, s, t = all_gather_cat(index, s, t)
        rows, last = _last_occurrence(index.to(self.student_bank.device))
        for bank, new in ((self.student_bank, s), (self.teacher_bank, t)):
            mixed = bank[rows] * self.momentum + new[last.to(new.device)].to(bank.device) * (1.0 - self.momentum)
            bank[rows] = F.normalize(mixed, dim=1)


class CRDLoss(nn.Module):
    """CRD's term (Tian et al. 2020): the sum of the two NCE sides; holds the embedding heads, memory and ``log Z``.

    Args:
        student_dim, teacher_dim: sizes of the flattened student and teacher features.
        num_samples: ``N``. When given, the memory is built now. Otherwise call :meth:`build_memory` later.
        embed_dim: size of the shared embedding space (128).
        num_negatives: ``K`` (16384). A ``K`` above ``N − 1`` is clipped to ``N − 1`` with a warning.
        temperature: τ of the scores (0.07).
        momentum: μ of the bank update (0.5).
        sampling: ``"exact"`` (the official default), ``"instance"`` or ``"uniform"``; see
            :meth:`ContrastiveMemory.sample`.
        labels: ``[N]`` classes of the samples, needed by ``"exact"`` sampling when ``num_samples`` is given.
        sync: gather across ranks under ``torch.distributed``; see :class:`ContrastiveMemory`.

    ``forward(student_features, teacher_features, index)`` returns ``{"loss": student_side + teacher_side,
    "student_anchor": …, "teacher_anchor": …}``. The student side contrasts the student embedding with the
    teacher bank, and the teacher side contrasts the teacher embedding with the student bank. Gradients reach
    the student features and both heads. The teacher features are detached.
    """

    log_z: Tensor

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        num_samples: int | None = None,
        embed_dim: int = 128,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        sampling: Sampling = "exact",
        labels: Tensor | None = None,
        sync: bool = True,
    ) -> None:
        super().__init__()
        if sampling not in SAMPLING_MODES:
            raise KDConfigError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}.")
        if num_negatives < 1:
            raise KDConfigError(f"num_negatives must be >= 1, got {num_negatives}.")
        if not temperature > 0:
            raise KDConfigError(f"temperature must be > 0, got {temperature}.")
        if not 0.0 <= momentum < 1.0:
            raise KDConfigError(f"momentum must be in [0, 1), got {momentum}.")
        self.embed_student = EmbedHead(student_dim, embed_dim)
        self.embed_teacher = EmbedHead(teacher_dim, embed_dim)
        self.embed_dim = embed_dim
        self.requested_negatives = num_negatives
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.momentum = momentum
        self.sampling = sampling
        self.sync = sync
        self.memory: ContrastiveMemory | None = None
        # log Z of the student-anchor and teacher-anchor sides; NaN until the first batch sets it.
        self.register_buffer("log_z", torch.full((2,), float("nan"), dtype=torch.float64))
        self._z_known = False
        if num_samples is not None:
            self.build_memory(num_samples, labels)

    def build_memory(self, num_samples: int, labels: Tensor | None = None) -> ContrastiveMemory:
        """Create the memory for ``num_samples`` rows. ``K`` is clipped to ``N − 1`` with a warning."""
        if self.sampling == "exact" and labels is None:
            raise KDConfigError(
                "sampling='exact' draws negatives from other classes and needs labels (one class per sample); "
                "pass labels=... or use sampling='instance'."
            )
        memory = ContrastiveMemory(num_samples, self.embed_dim, self.momentum, labels)
        self.num_negatives = self.requested_negatives
        if self.num_negatives > num_samples - 1:
            warnings.warn(
                f"CRD: num_negatives={self.requested_negatives} exceeds the {num_samples - 1} other samples of a "
                f"{num_samples}-sample training set; using num_negatives={num_samples - 1}.",
                stacklevel=2,
            )
            self.num_negatives = num_samples - 1
        device = self.log_z.device
        self.memory = memory.to(device)
        return self.memory

    @property
    def z_is_set(self) -> bool:
        """Whether ``log Z`` has been estimated (read from the buffer once, then cached)."""
        if not self._z_known:
            self._z_known = not bool(torch.isnan(self.log_z).any())
        return self._z_known

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._z_known = False  # re-read the loaded log Z

    def _estimate_log_z(self, logits_s: Tensor, logits_t: Tensor) -> None:
        """``log Z = log(N · mean(exp(logits)))`` per side, over the batches of all ranks when distributed."""
        stats = torch.stack(
            [
                torch.logsumexp(logits_s.detach().double().flatten(), 0),
                torch.logsumexp(logits_t.detach().double().flatten(), 0),
                torch.tensor(float(logits_s.numel()), dtype=torch.float64, device=logits_s.device),
            ]
        )[None]
        if self.sync:
            (stats,) = all_gather_cat(stats)
        lse = torch.logsumexp(stats[:, :2], dim=0)
        count = stats[:, 2].sum()
        assert self.memory is not None
        self.log_z.copy_(lse - torch.log(count) + math.log(self.memory.num_samples))
        self._z_known = True

    def forward(
        self,
        student_features: Tensor,
        teacher_features: Tensor,
        index: Tensor,
        contrast_index: Tensor | None = None,
        update: bool = True,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """CRD loss of a batch, followed by the memory update.

        Args:
            student_features: ``[B, ...]`` student features, flattened by the head.
            teacher_features: ``[B, ...]`` teacher features, detached.
            index: ``[B]`` dataset indices of the batch, in ``[0, N)``.
            contrast_index: optional ``[B, 1 + K']`` rows to contrast with. Column 0 is the positive. If it is
                not given, the rows are drawn with ``sampling``.
            update: run the momentum update of the batch's rows after scoring. Only the training step should.
            generator: random generator of the sampling.
        """
        if self.memory is None:
            raise RuntimeError("CRDLoss has no memory yet: call build_memory(num_samples, labels) first.")
        index = index.reshape(-1).long()
        batch = index.numel()
        if student_features.shape[0] != batch or teacher_features.shape[0] != batch:
            raise KDConfigError(
                f"student_features {tuple(student_features.shape)}, teacher_features {tuple(teacher_features.shape)} "
                f"and index {tuple(index.shape)} must have the same batch size."
            )
        memory = self.memory
        index = index.to(memory.student_bank.device)
        if self.sync:
            memory._ensure_synced()
        if contrast_index is None:
            contrast_index = memory.sample(index, self.num_negatives, self.sampling, generator)  # type: ignore[arg-type]
        elif contrast_index.dim() != 2 or contrast_index.shape[0] != batch or contrast_index.shape[1] < 2:
            raise KDConfigError(f"contrast_index must be [B={batch}, 1 + K], got {tuple(contrast_index.shape)}.")
        contrast_index = contrast_index.to(memory.student_bank.device).long()
        s = self.embed_student(student_features)
        t = self.embed_teacher(teacher_features.detach())
        # The bank rows are constants. Autograd keeps them for the backward of v @ bankᵀ, and the update below
        # modifies them in place, so the product uses a copy when a gradient is needed (N·dim values: cheap).
        teacher_bank, student_bank = memory.teacher_bank, memory.student_bank
        if update and s.requires_grad:
            teacher_bank = teacher_bank.clone()
        if update and t.requires_grad:
            student_bank = student_bank.clone()
        with torch.autocast(device_type=s.device.type, enabled=False):
            # Every score v·m for the whole bank, then the sampled columns.
            logits_s = (s.float() @ teacher_bank.t()).gather(1, contrast_index) / self.temperature
            logits_t = (t.float() @ student_bank.t()).gather(1, contrast_index) / self.temperature
            if not self.z_is_set:
                self._estimate_log_z(logits_s, logits_t)
            n = memory.num_samples
            student_anchor = nce_loss(logits_s, self.log_z[0].float(), n)
            teacher_anchor = nce_loss(logits_t, self.log_z[1].float(), n)
        if update:
            memory.update_(index, s, t, sync=self.sync)
        return weighted_terms({"student_anchor": student_anchor, "teacher_anchor": teacher_anchor})
