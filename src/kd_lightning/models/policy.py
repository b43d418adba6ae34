"""Policies for embodied distillation: one network, one forward pass, one head per level of a task hierarchy.

:class:`HierarchicalPolicy` reads one observation of an embodied environment (see
:mod:`kd_lightning.data.envs.common`): the student's ``image`` (egocentric pixels or symbolic grid) and ``mission``,
or, for a privileged teacher, the ``privileged`` grid and ``privileged_vector``. Its heads follow the hierarchy
``level -> factor -> classes`` top-down (manager -> conductor -> actor): each level's head sees the trunk features
and the softmax outputs of the levels above it (``condition_on_parents``), so the actor is conditioned on the
sub-task and subgoal the network itself predicts, as in the "single model" that STEVE-2 distils an agent system
into (arXiv 2404.04619; the architecture is our reconstruction after ``methods/14_steve2_embodied.md`` §5). A flat
policy is the same network with the actor level only.

Encoders: a grid of integer categories per channel (BabyAI symbolic views, semantic maps) is one-hot encoded and
convolved at full resolution; pixels go through a strided CNN (IMPALA-like widths). The mission (word ids) is
embedded, read by a GRU and modulates every conv block by FiLM (as BabyAI's FiLM agents do). No memory:
the policy is reactive (documented limitation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kd_lightning.errors import KDConfigError

__all__ = ["HierarchicalPolicy"]


class _GridEncoder(nn.Module):
    """One-hot categories per channel -> 3x3 convolutions at full resolution (``blocks`` conv layers)."""

    def __init__(self, categories: Sequence[int], width: int, blocks: int = 2) -> None:
        super().__init__()
        self.categories = [int(c) for c in categories]
        self.blocks = nn.ModuleList(
            nn.Conv2d(sum(self.categories) if i == 0 else width, width, 3, padding=1) for i in range(blocks)
        )
        self.widths = [width] * blocks

    def prepare(self, grid: Tensor) -> Tensor:  # (B, H, W, C) integer categories -> (B, ΣC, H, W)
        grid = grid.long()
        planes = [F.one_hot(grid[..., c].clamp(0, n - 1), n) for c, n in enumerate(self.categories)]
        return torch.cat(planes, dim=-1).permute(0, 3, 1, 2).float()


class _PixelEncoder(nn.Module):
    """uint8 pixels -> strided convolutions (16/32/32 channels by default)."""

    def __init__(self, channels: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Conv2d(channels if i == 0 else widths[i - 1], w, 3, stride=2, padding=1) for i, w in enumerate(widths)
        )
        self.widths = [int(w) for w in widths]

    def prepare(self, image: Tensor) -> Tensor:  # (B, H, W, C) uint8 -> (B, C, H, W) in [0, 1]
        return image.permute(0, 3, 1, 2).float() / 255.0


class HierarchicalPolicy(nn.Module):
    """Egocentric (student) or privileged (teacher) policy with one head per hierarchy level.

    Args:
        hierarchy: ``level -> factor -> classes`` in top-down order; the last level's first factor is the action.
            Must be a sub-hierarchy of the environment's (checked against the data at setup).
        observation: which view the network reads: ``image`` (+ ``mission``), the student's, or ``privileged``
            (grid + ``privileged_vector`` + ``mission``), a teacher's.
        input_shape: ``(H, W, C)`` of that view (checked against the environment).
        input_categories: categories per channel when the view is a grid of integers (BabyAI symbolic, semantic
            maps); ``None`` for uint8 pixels.
        vector_size: length of ``privileged_vector`` read by a privileged network (0: none).
        vocab_size: mission word ids (0 pads); 0 ignores the mission.
        width: channels of the grid encoder / last pixel stage.
        pixel_widths: channels of the strided pixel CNN.
        hidden: trunk width.
        mission_dim: width of the mission GRU.
        condition_on_parents: feed each head the softmax outputs of the levels above it.
    """

    def __init__(
        self,
        hierarchy: Mapping[str, Mapping[str, int]],
        observation: Literal["image", "privileged"] = "image",
        input_shape: Sequence[int] = (7, 7, 3),
        input_categories: Sequence[int] | None = (11, 6, 3),
        vector_size: int = 0,
        vocab_size: int = 0,
        width: int = 32,
        pixel_widths: Sequence[int] = (16, 32, 32),
        hidden: int = 128,
        mission_dim: int = 64,
        condition_on_parents: bool = True,
    ) -> None:
        super().__init__()
        if not hierarchy or any(not factors for factors in hierarchy.values()):
            raise KDConfigError("hierarchy", "needs at least one level with one factor", "e.g. {actor: {action: 7}}")
        if observation not in ("image", "privileged"):
            raise KDConfigError("observation", f"must be 'image' or 'privileged', got {observation!r}")
        if len(input_shape) != 3:
            raise KDConfigError("input_shape", f"must be (height, width, channels), got {list(input_shape)}")
        if input_categories is not None and len(input_categories) != input_shape[2]:
            raise KDConfigError(
                "input_categories",
                f"has {len(input_categories)} entries for {input_shape[2]} channels",
                "give one category count per channel, or null for pixels",
            )
        self.hierarchy = {level: {f: int(n) for f, n in factors.items()} for level, factors in hierarchy.items()}
        self.observation = observation
        self.input_shape = tuple(int(v) for v in input_shape)
        self.input_categories = None if input_categories is None else tuple(int(c) for c in input_categories)
        self.vector_size = int(vector_size)
        self.vocab_size = int(vocab_size)
        if input_categories is not None:
            self.encoder: _GridEncoder | _PixelEncoder = _GridEncoder(input_categories, width)
        else:
            self.encoder = _PixelEncoder(input_shape[2], pixel_widths)
        if vocab_size > 0:
            self.embedding = nn.Embedding(vocab_size, mission_dim, padding_idx=0)
            self.mission_rnn = nn.GRU(mission_dim, mission_dim, batch_first=True)
            self.film = nn.ModuleList(nn.Linear(mission_dim, 2 * w) for w in self.encoder.widths)
        with torch.no_grad():
            probe = self._features(torch.zeros(1, *self.input_shape, dtype=torch.uint8), None)
        flat = probe.numel()
        self.trunk = nn.Sequential(
            nn.Linear(flat + self.vector_size, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.condition_on_parents = condition_on_parents
        self.heads = nn.ModuleDict()
        parents = 0
        for level, factors in self.hierarchy.items():
            self.heads[level] = nn.Linear(hidden + (parents if condition_on_parents else 0), sum(factors.values()))
            parents += sum(factors.values())

    @property
    def input_key(self) -> str:
        """The observation key this network reads (``image`` or ``privileged``)."""
        return self.observation

    def _mission(self, mission: Tensor) -> Tensor:
        lengths = (mission > 0).sum(dim=1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embedding(mission.long()), lengths, batch_first=True, enforce_sorted=False
        )
        _, state = self.mission_rnn(packed)
        return state[-1]

    def _features(self, view: Tensor, mission: Tensor | None) -> Tensor:
        """Conv blocks, each followed by ReLU and, with a mission, FiLM (``x·(1 + γ) + β`` per channel)."""
        x = self.encoder.prepare(view)
        for i, conv in enumerate(self.encoder.blocks):
            x = F.relu(conv(x))
            if mission is not None:
                gamma, beta = self.film[i](mission).chunk(2, dim=-1)
                x = x * (1 + gamma[..., None, None]) + beta[..., None, None]
        return x

    def forward(self, observation: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{"level/factor": logits}`` for every factor of the hierarchy."""
        mission = self._mission(observation["mission"]) if self.vocab_size > 0 else None
        features = self._features(observation[self.observation], mission)
        inputs = [features.flatten(1)]
        if self.vector_size:
            inputs.append(observation["privileged_vector"].float())
        trunk = self.trunk(torch.cat(inputs, dim=1))
        outputs: dict[str, Tensor] = {}
        parents: list[Tensor] = []
        for level, factors in self.hierarchy.items():
            head_input = torch.cat([trunk, *parents], dim=1) if self.condition_on_parents else trunk
            logits = self.heads[level](head_input)
            for name, chunk in zip(factors, logits.split(list(factors.values()), dim=1)):
                outputs[f"{level}/{name}"] = chunk
                parents.append(chunk.softmax(dim=1))
        return outputs

    @property
    def action_key(self) -> str:
        """The output key of the action (the last level's first factor)."""
        level = list(self.hierarchy)[-1]
        return f"{level}/{next(iter(self.hierarchy[level]))}"
