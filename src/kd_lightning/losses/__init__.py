"""Distillation losses in plain torch: usable without Lightning or kd-lightning's Trainer.

Loss modules are called as ``loss(student_logits, teacher_logits, target)`` and return
``{"loss": total, **weighted_parts}`` (:func:`~kd_lightning.losses.terms.weighted_terms`); functions return
scalars (or per-item values). Losses that change over training follow the scheduled-loss protocol
(:class:`~kd_lightning.losses.schedule.ScheduledLoss`).

Example:
    >>> import torch
    >>> from kd_lightning.losses import KDLoss
    >>> out = KDLoss(temperature=4.0)(torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,)))
    >>> sorted(out)
    ['ce', 'kd', 'loss']
"""

from kd_lightning.losses.adakd import (
    AdaKDLoss,
    adakd_difficulty,
    idts_temperatures,
    select_hardest,
)
from kd_lightning.losses.bd_kd import (
    BDKDLoss,
    bd_kd_weights,
)
from kd_lightning.losses.bild import (
    BiLDLoss,
    DBiLDLoss,
    dynamic_k,
    dynamic_logit_difference_kl,
    logit_difference_kl,
    pair_differences,
)
from kd_lightning.losses.chunked import (
    CHUNK_OBJECTIVES,
    ChunkObjective,
    chunked_distillation_loss,
)
from kd_lightning.losses.contrastive import (
    ContrastiveMemory,
    CRDLoss,
    EmbedHead,
    all_gather_cat,
    nce_loss,
)
from kd_lightning.losses.divergences import (
    entropy,
    forward_kl,
    kl_divergence,
    mixed_kl,
    reduce_items,
    reverse_kl,
)
from kd_lightning.losses.ensemble import EnsembleKDLoss, ensemble_log_probs
from kd_lightning.losses.feature import (
    AttentionTransferLoss,
    HintLoss,
    attention_map,
    attention_transfer_loss,
    attention_transfer_term,
    hint_loss,
)
from kd_lightning.losses.kl_mixing import (
    MixedKLLoss,
)
from kd_lightning.losses.lm import (
    TOKEN_OBJECTIVES,
    align_vocab,
    check_vocab_sizes,
    count_valid_tokens,
    generalized_jsd,
    log_mixture_ratio,
    normalize_token_sum,
    shift_for_next_token,
    skew_kl,
    skew_reverse_kl,
    token_cross_entropy,
    token_objective,
    total_variation,
)
from kd_lightning.losses.lm_objectives import LM_OBJECTIVES, TokenDivergence, build_token_objective
from kd_lightning.losses.logit import (
    DKDLoss,
    KDLoss,
    LogitStandardKDLoss,
    PLDLoss,
    dkd_terms,
    kd_kl_div,
    pld_loss,
    standardize_logits,
)
from kd_lightning.losses.mae import (
    DMAELoss,
    MaskIndices,
    masked_reconstruction_loss,
    normalized_l1_loss,
    patchify,
    random_masking,
    unpatchify,
)
from kd_lightning.losses.mix_kd import (
    MixKDLoss,
    MixupPlan,
    apply_mixup,
    mix_targets,
    mixstd_loss,
    mixup_kd_loss,
    partial_mixup,
    sample_mixup,
    soft_cross_entropy,
    std_scale,
)
from kd_lightning.losses.relation import (
    RKDLoss,
    pairwise_distances,
    rkd_angle_loss,
    rkd_angles,
    rkd_distance_loss,
)
from kd_lightning.losses.schedule import Progress, ScheduledLoss
from kd_lightning.losses.self_distill import (
    GTSelfDistillLoss,
    kernel_ridge_self_distillation,
    kernel_ridge_self_distillation_limit,
    optimal_alpha,
    parameter_norm_penalty,
    rbf_kernel,
    softmax_mse,
)
from kd_lightning.losses.skd import (
    SKDLoss,
)
from kd_lightning.losses.sparse import TopKTargets, sparse_kl, topk_targets
from kd_lightning.losses.swing import (
    PrivacyScores,
    SwingLoss,
    noise_scale,
    noisy_soft_targets,
    sample_noise,
    soft_target_kl,
    swing_temperatures,
)
from kd_lightning.losses.taid import (
    TAIDLoss,
    pending_over_ranks,
    taid_interpolated_logits,
    taid_loss,
)
from kd_lightning.losses.terms import check_weights, weighted_terms
from kd_lightning.losses.tgeo_kd import (
    FEATURE_VARIANTS,
    ClassMeanAccumulator,
    FusionRatioNet,
    TGeoKDLoss,
    fusion_feature_dim,
    geometry_features,
    tgeo_kd_terms,
)
from kd_lightning.losses.token_graph import (
    TRGLoss,
    contextual_loss,
    edge_loss,
    gather_tokens,
    node_loss,
    sample_token_indices,
    token_graph,
    tokens_from_features,
)
from kd_lightning.losses.transport import (
    SinKDLoss,
    annealed_temperature,
    l1_cost,
    sinkhorn_distance,
    sinkhorn_plan,
)

__all__ = [
    "CHUNK_OBJECTIVES",
    "FEATURE_VARIANTS",
    "LM_OBJECTIVES",
    "TOKEN_OBJECTIVES",
    "AdaKDLoss",
    "AttentionTransferLoss",
    "BDKDLoss",
    "BiLDLoss",
    "CRDLoss",
    "ChunkObjective",
    "ClassMeanAccumulator",
    "ContrastiveMemory",
    "DBiLDLoss",
    "DKDLoss",
    "DMAELoss",
    "EmbedHead",
    "EnsembleKDLoss",
    "FusionRatioNet",
    "GTSelfDistillLoss",
    "HintLoss",
    "KDLoss",
    "LogitStandardKDLoss",
    "MaskIndices",
    "MixKDLoss",
    "MixedKLLoss",
    "MixupPlan",
    "PLDLoss",
    "PrivacyScores",
    "Progress",
    "RKDLoss",
    "SKDLoss",
    "ScheduledLoss",
    "SinKDLoss",
    "SwingLoss",
    "TAIDLoss",
    "TGeoKDLoss",
    "TRGLoss",
    "TokenDivergence",
    "TopKTargets",
    "adakd_difficulty",
    "align_vocab",
    "all_gather_cat",
    "annealed_temperature",
    "apply_mixup",
    "attention_map",
    "attention_transfer_loss",
    "attention_transfer_term",
    "bd_kd_weights",
    "build_token_objective",
    "check_vocab_sizes",
    "check_weights",
    "chunked_distillation_loss",
    "contextual_loss",
    "count_valid_tokens",
    "dkd_terms",
    "dynamic_k",
    "dynamic_logit_difference_kl",
    "edge_loss",
    "ensemble_log_probs",
    "entropy",
    "forward_kl",
    "fusion_feature_dim",
    "gather_tokens",
    "generalized_jsd",
    "geometry_features",
    "hint_loss",
    "idts_temperatures",
    "kd_kl_div",
    "kernel_ridge_self_distillation",
    "kernel_ridge_self_distillation_limit",
    "kl_divergence",
    "l1_cost",
    "log_mixture_ratio",
    "logit_difference_kl",
    "masked_reconstruction_loss",
    "mix_targets",
    "mixed_kl",
    "mixstd_loss",
    "mixup_kd_loss",
    "nce_loss",
    "node_loss",
    "noise_scale",
    "noisy_soft_targets",
    "normalize_token_sum",
    "normalized_l1_loss",
    "optimal_alpha",
    "pair_differences",
    "pairwise_distances",
    "parameter_norm_penalty",
    "partial_mixup",
    "patchify",
    "pending_over_ranks",
    "pld_loss",
    "random_masking",
    "rbf_kernel",
    "reduce_items",
    "reverse_kl",
    "rkd_angle_loss",
    "rkd_angles",
    "rkd_distance_loss",
    "sample_mixup",
    "sample_noise",
    "sample_token_indices",
    "select_hardest",
    "shift_for_next_token",
    "sinkhorn_distance",
    "sinkhorn_plan",
    "skew_kl",
    "skew_reverse_kl",
    "soft_cross_entropy",
    "soft_target_kl",
    "softmax_mse",
    "sparse_kl",
    "standardize_logits",
    "std_scale",
    "swing_temperatures",
    "taid_interpolated_logits",
    "taid_loss",
    "tgeo_kd_terms",
    "token_cross_entropy",
    "token_graph",
    "token_objective",
    "tokens_from_features",
    "topk_targets",
    "total_variation",
    "unpatchify",
    "weighted_terms",
]
