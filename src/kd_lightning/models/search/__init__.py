"""Training-free student architecture search for distillation: DisWOT (Dong, Li & Wei, CVPR 2023).

Pure torch: the DisWOT teacher-student similarity scores and the NASWOT / Zen / cost baselines
(:mod:`.scores`), search spaces (:mod:`.spaces`: SmallCNN and CIFAR-ResNet width/depth, NAS-Bench-201 cells
from :mod:`.nb201`), regularised evolution under a parameter/FLOPs budget with the official code's tournament bug
fixed (:mod:`.evolution`) and the search in one call (:mod:`.pipeline`). The ``kd search-student`` command
(:mod:`kd_lightning.commands.search_student`) runs it from a config and writes a ``kd fit`` config of the winner.
"""

from __future__ import annotations

from .evolution import PARENT_SELECTIONS, Budget, Candidate, SearchResult, regularized_evolution, select_parent
from .nb201 import NB201_OPS, OPERATIONS, NB201Network, arch_string, parse_arch
from .pipeline import evaluate_network, search_students
from .scores import (
    SEMANTIC_MODES,
    DisWOTScorer,
    class_gram_distance,
    classifier_of,
    count_cost,
    naswot_score,
    pre_pool_tap,
    relation_distance,
    resolve_semantic_mode,
    semantic_distance,
    zen_score,
)
from .spaces import SPACES, CifarResNetSpace, NB201Space, SearchSpace, SmallCNNSpace, build_space

__all__ = [
    "NB201_OPS",
    "OPERATIONS",
    "PARENT_SELECTIONS",
    "SEMANTIC_MODES",
    "SPACES",
    "Budget",
    "Candidate",
    "CifarResNetSpace",
    "DisWOTScorer",
    "NB201Network",
    "NB201Space",
    "SearchResult",
    "SearchSpace",
    "SmallCNNSpace",
    "arch_string",
    "build_space",
    "class_gram_distance",
    "classifier_of",
    "count_cost",
    "evaluate_network",
    "naswot_score",
    "parse_arch",
    "pre_pool_tap",
    "regularized_evolution",
    "relation_distance",
    "resolve_semantic_mode",
    "search_students",
    "select_parent",
    "semantic_distance",
    "zen_score",
]
