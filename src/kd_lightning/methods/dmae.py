"""DMAE: masked autoencoders enable efficient knowledge distillers (Bai et al., CVPR 2023; arXiv 2208.12256)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError, TeacherCheckpointError
from kd_lightning.losses._common import gather_tokens
from kd_lightning.losses.mae import DMAELoss, MaskIndices, patchify, random_masking
from kd_lightning.methods.tasks.masked_image import MaskedImageDistillation
from kd_lightning.models.checkpoints import check_checkpoint_exists, read_checkpoint, select_role, state_dict_of
from kd_lightning.models.mae_decoder import MAEDecoder
from kd_lightning.models.positional import sincos_pos_embed_2d

__all__ = ["DMAE"]

_VIT_ATTRIBUTES = ("patch_embed", "blocks", "cls_token", "pos_embed", "num_prefix_tokens")
#: Student modules that MAE pre-training never uses (classifier): frozen so that DDP sees no unused parameters.
_UNUSED_STUDENT_MODULES = ("head", "fc_norm", "attn_pool", "head_drop")


def as_vit(model: nn.Module, field: str) -> nn.Module:
    """The timm ``VisionTransformer`` inside ``model`` (itself, or ``model.model`` for a ``TimmModel``).

    Raises:
        KDConfigError: ``model`` is no ViT with absolute position embeddings and fixed image size.
    """
    vit = model
    if not all(hasattr(vit, a) for a in _VIT_ATTRIBUTES) and isinstance(getattr(model, "model", None), nn.Module):
        vit = model.model
    missing = [a for a in _VIT_ATTRIBUTES if not hasattr(vit, a)]
    if missing:
        raise KDConfigError(
            f"model.init_args.{field} ({type(model).__name__}) is not a timm VisionTransformer (it lacks "
            f"{', '.join(missing)}): DMAE needs ViTs, e.g. TimmModel with model_name vit_tiny_patch16_224."
        )
    if vit.pos_embed is None or getattr(vit, "dynamic_img_size", False):
        raise KDConfigError(
            f"model.init_args.{field}: DMAE needs a ViT with an absolute position embedding and a fixed image size "
            "(pos_embed set, dynamic_img_size false)."
        )
    return vit


def _vit_dim(vit: nn.Module) -> int:
    return int(getattr(vit, "embed_dim", None) or vit.pos_embed.shape[-1])


def _block_indices(indices: Sequence[int], depth: int, field: str) -> list[int]:
    out = []
    for index in indices:
        if not -depth <= int(index) < depth:
            raise KDConfigError(
                f"model.init_args.{field}: block {index} does not exist in a ViT of depth {depth} "
                f"(0-based; valid: 0..{depth - 1} or negative from the end)."
            )
        out.append(int(index) % depth)
    return out


class DMAE(MaskedImageDistillation):
    """DMAE: MAE pre-training of the student plus feature distillation from a (MAE pre-trained) teacher.

    One random mask per image (``mask_ratio`` of the patches removed) is drawn here and shared by both networks:
    teacher and student see the same visible patches (same ``ids_keep``). The teacher runs only up to its deepest
    distilled block (the rest of it never executes). The student encodes the visible patches and its lightweight
    MAE decoder reconstructs every patch::

        L = L_rec + w · Σ_k mean| normalize(F_T^k) - normalize(W_k F_S^k) |
        L_rec = Σ_{b,l} m_{b,l} · mean_c (pred - patchify(x))² / Σ m        (m = 1 on removed patches)

    ``F_S^k`` / ``F_T^k``: outputs of student block ``student_blocks[k]`` / teacher block ``teacher_blocks[k]``
    (before the final norm; CLS token + visible patches, register tokens dropped), ``W_k`` a ``Linear(D_s, D_t)``,
    normalisation L2 over channels, L1 averaged over all elements (``nn.L1Loss``). Verified against the official
    code (UCSC-VLAA/DMAE ``models_mae_distill.py``, ``engine_distill.py``, ``pretrain.sh``): masking, taps,
    projection, normalised L1, pixel target, the loss sum. Defaults are its ViT-L → ViT-B recipe (blocks 8 / 17,
    decoder 512 × 8 × 16 heads, mask 0.75, w = 1).

    Differences from the official code (all arguments): the mask is drawn by the method, not by the teacher;
    the teacher is truncated after its deepest tapped block (the official code runs all of it plus its decoder,
    same result); ``norm_pix_loss`` defaults to False (one stored version of ``pretrain.sh`` passes
    ``--norm_pix_loss``, another does not: UNVERIFIED which produced 84.0); the student keeps timm's
    initialisation except its position embedding (MAE's xavier/normal init of the encoder is not replicated:
    RECONSTRUCTION). Works on timm ``VisionTransformer`` models, bare or inside ``TimmModel``; pretrained weights
    come only through ``teacher_ckpt`` — an MAE checkpoint (encoder, or encoder + decoder) loads into a timm ViT
    by matching keys, the unused head/decoder/later-block keys may be absent or extra, the used ones must fit.

    Evaluation: MAE pre-training trains no classifier, so validation/test report ``{stage}/loss``,
    ``{stage}/rec`` and ``{stage}/distill`` on masks drawn from a fixed seed (``eval_mask_seed``; the same masks
    every epoch) instead of accuracy; the class-count check is skipped (an MAE teacher has no head). The student's
    classifier head is frozen during pre-training (it is unused); fine-tune the exported student afterwards.
    ``forward`` is still the student's classification forward.

    Args:
        student: timm ViT (or ``TimmModel``) to pre-train.
        teacher: timm ViT (or ``TimmModel``), frozen; same patch grid as the student.
        mask_ratio: share of patches removed per image.
        student_blocks: student blocks tapped (0-based, negatives from the end), paired in order with
            ``teacher_blocks``.
        teacher_blocks: teacher blocks tapped.
        distill_weight: ``w``.
        norm_pix_loss: reconstruct per-patch normalised pixels.
        decoder_dim: decoder width.
        decoder_depth: decoder blocks.
        decoder_num_heads: decoder attention heads.
        decoder_mlp_ratio: decoder MLP width multiple.
        fixed_student_pos_embed: replace the student's position embedding by MAE's fixed 2-D sin-cos one (not
            trained), as in the official student.
        no_weight_decay_1d: no weight decay on biases, norms and other 1-D parameters (MAE/timm's
            ``add_weight_decay``); the optimiser's ``weight_decay`` applies to the rest.
        **kwargs: ``eval_mask_seed``, ``teacher_ckpt``, ``optimizer``, ``lr_scheduler`` and the other arguments
            of :class:`~kd_lightning.methods.tasks.masked_image.MaskedImageDistillation`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        mask_ratio: float = 0.75,
        student_blocks: Sequence[int] = (8,),
        teacher_blocks: Sequence[int] = (17,),
        distill_weight: float = 1.0,
        norm_pix_loss: bool = False,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        fixed_student_pos_embed: bool = True,
        no_weight_decay_1d: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(student=student, teacher=teacher, **kwargs)
        s_vit, t_vit = as_vit(student, "student"), as_vit(teacher, "teacher")
        if not 0.0 <= mask_ratio < 1.0:
            raise KDConfigError(f"model.init_args.mask_ratio must be in [0, 1), got {mask_ratio}.")
        s_grid, t_grid = tuple(s_vit.patch_embed.grid_size), tuple(t_vit.patch_embed.grid_size)
        s_patch, t_patch = tuple(s_vit.patch_embed.patch_size), tuple(t_vit.patch_embed.patch_size)
        if s_grid != t_grid or s_patch != t_patch:
            raise KDConfigError(
                f"model.init_args.student and teacher must cut images into the same patches to share a mask: student "
                f"{s_patch} patches on a {s_grid} grid, teacher {t_patch} on {t_grid}. Set the same img_size and "
                "patch_size."
            )
        if int(math.prod(s_grid) * (1 - mask_ratio)) < 1:
            raise KDConfigError(f"model.init_args.mask_ratio={mask_ratio} leaves no visible patch: lower it.")
        if (s_vit.cls_token is None) != (t_vit.cls_token is None):
            raise KDConfigError(
                "model.init_args.student and teacher must both have a class token or both lack one (DMAE distils "
                "the CLS token with the visible patches)."
            )
        if len(student_blocks) != len(teacher_blocks) or not student_blocks:
            raise KDConfigError(
                f"model.init_args.student_blocks ({list(student_blocks)}) and teacher_blocks ({list(teacher_blocks)}) "
                "must be non-empty lists of the same length (pairs in order)."
            )
        self.student_blocks = _block_indices(student_blocks, len(s_vit.blocks), "student_blocks")
        self.teacher_blocks = _block_indices(teacher_blocks, len(t_vit.blocks), "teacher_blocks")
        self.teacher_stop = max(self.teacher_blocks)
        self.mask_ratio = mask_ratio
        self.no_weight_decay_1d = no_weight_decay_1d
        self.patch_size = s_patch
        self.grid_size = s_grid
        self.in_chans = int(s_vit.patch_embed.proj.in_channels)
        self.img_size = tuple(s_vit.patch_embed.img_size)
        try:
            self.criterion = DMAELoss(distill_weight=distill_weight, norm_pix_loss=norm_pix_loss)
            self.decoder = MAEDecoder(
                encoder_dim=_vit_dim(s_vit),
                grid_size=s_grid,
                patch_dim=math.prod(s_patch) * self.in_chans,
                dim=decoder_dim,
                depth=decoder_depth,
                num_heads=decoder_num_heads,
                mlp_ratio=decoder_mlp_ratio,
                num_prefix_tokens=int(s_vit.num_prefix_tokens),
            )
        except ValueError as err:
            raise KDConfigError(f"model.init_args: {err}") from None
        self.projections = nn.ModuleList(nn.Linear(_vit_dim(s_vit), _vit_dim(t_vit)) for _ in self.student_blocks)
        for projection in self.projections:  # official: timm Linear init via MAE's _init_weights (xavier, zero bias)
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)
        if fixed_student_pos_embed:
            prefix = 0 if getattr(s_vit, "no_embed_class", False) else int(s_vit.num_prefix_tokens)
            try:
                pos = sincos_pos_embed_2d(_vit_dim(s_vit), s_grid, prefix)
            except ValueError as err:
                raise KDConfigError(f"model.init_args.fixed_student_pos_embed: {err}") from None
            with torch.no_grad():
                s_vit.pos_embed.copy_(pos.reshape(s_vit.pos_embed.shape))
            s_vit.pos_embed.requires_grad_(False)
        for name in _UNUSED_STUDENT_MODULES:
            module = getattr(s_vit, name, None)
            if isinstance(module, nn.Module):
                module.requires_grad_(False)
        self._check_teacher_weights()

    # ------------------------------------------------------------------ networks
    @property
    def student_vit(self) -> nn.Module:
        return as_vit(self.student, "student")

    @property
    def teacher_vit(self) -> nn.Module:
        return as_vit(self.teacher, "teacher")

    def mask(self, batch_size: int, generator: torch.Generator | None = None) -> MaskIndices:
        """One random mask per sample for the shared patch grid."""
        return random_masking(batch_size, math.prod(self.grid_size), self.mask_ratio, self.device, generator)

    @staticmethod
    def embed_visible(vit: nn.Module, x: Tensor, ids_keep: Tensor) -> Tensor:
        """Patch embedding + position embedding of the visible patches, with the prefix tokens in front (MAE)."""
        tokens = vit.patch_embed(x)
        if tokens.dim() == 4:  # NHWC output
            tokens = tokens.flatten(1, 2)
        n_prefix = int(vit.num_prefix_tokens)
        pos = vit.pos_embed
        prefix_pos, patch_pos = (
            (None, pos) if getattr(vit, "no_embed_class", False) else (pos[:, :n_prefix], pos[:, n_prefix:])
        )
        tokens = gather_tokens(tokens + patch_pos, ids_keep)
        prefix = [
            t.expand(x.shape[0], -1, -1) for t in (vit.cls_token, getattr(vit, "reg_token", None)) if t is not None
        ]
        if prefix:
            prefix_tokens = torch.cat(prefix, dim=1)
            if prefix_pos is not None:
                prefix_tokens = prefix_tokens + prefix_pos
            tokens = torch.cat([prefix_tokens, tokens], dim=1)
        for name in ("pos_drop", "norm_pre"):
            module = getattr(vit, name, None)
            if module is not None:
                tokens = module(tokens)
        return tokens

    @staticmethod
    def distilled_tokens(vit: nn.Module, features: Tensor) -> Tensor:
        """CLS token (if any) + patch tokens of a block output; register tokens dropped."""
        n_prefix = int(vit.num_prefix_tokens)
        if vit.cls_token is not None:
            return torch.cat([features[:, :1], features[:, n_prefix:]], dim=1)
        return features[:, n_prefix:]

    def run_blocks(
        self, vit: nn.Module, tokens: Tensor, taps: Sequence[int], stop: int | None
    ) -> tuple[Tensor, list[Tensor]]:
        """Apply ``vit.blocks`` in order, stopping after block ``stop`` (``None``: all), reading the ``taps``."""
        wanted = set(taps)
        feats: dict[int, Tensor] = {}
        for index, block in enumerate(vit.blocks):
            tokens = block(tokens)
            if index in wanted:
                feats[index] = self.distilled_tokens(vit, tokens)
            if stop is not None and index >= stop:
                break
        return tokens, [feats[i] for i in taps]

    def teacher_features(self, x: Tensor, ids_keep: Tensor) -> list[Tensor]:
        """Teacher block outputs at ``teacher_blocks`` on the visible patches; blocks after the last tap never run."""
        vit = self.teacher_vit
        with torch.no_grad():
            tokens = self.embed_visible(vit, x, ids_keep)
            _, feats = self.run_blocks(vit, tokens, self.teacher_blocks, stop=self.teacher_stop)
        return [f.detach() for f in feats]

    def student_forward(self, x: Tensor, masks: MaskIndices) -> tuple[Tensor, list[Tensor]]:
        """Student encoder on the visible patches, then the decoder: ``(pred [B, L, P], projected features)``."""
        vit = self.student_vit
        tokens = self.embed_visible(vit, x, masks.ids_keep)
        tokens, feats = self.run_blocks(vit, tokens, self.student_blocks, stop=None)
        latent = vit.norm(tokens)
        pred = self.decoder(latent, masks.ids_restore)
        return pred, [proj(f) for proj, f in zip(self.projections, feats, strict=True)]

    def mae_loss(self, x: Tensor, masks: MaskIndices | None = None) -> dict[str, Tensor]:
        """DMAE's loss parts ``{"loss", "rec", "distill"}`` for images ``x`` (a fresh mask unless given)."""
        if masks is None:
            masks = self.mask(x.shape[0])
        teacher_feats = self.teacher_features(x, masks.ids_keep)
        pred, student_feats = self.student_forward(x, masks)
        target = patchify(x, self.patch_size)
        return self.criterion(pred, target, masks.mask, student_feats, teacher_feats)

    def masked_loss(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return self.mae_loss(x, self.mask(x.shape[0], generator) if generator is not None else None)

    def expected_input_shape(self) -> tuple[int, ...]:
        return (self.in_chans, *self.img_size)

    def configure_optimizers(self) -> Any:
        params = self.trainable_parameters()
        groups: Any = params
        if self.no_weight_decay_1d:
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            groups = [g for g in ({"params": decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        return self.build_optimizers(groups)

    # ------------------------------------------------------------------ teacher weights
    def load_teacher(self, path: str | Path, name: str = "teacher") -> None:
        """Load the teacher: an exact match first, else an MAE checkpoint's encoder keys into the timm ViT.

        MAE/DMAE checkpoints (``{"model": ...}`` with ``blocks.*``, ``patch_embed.*``, ``cls_token``,
        ``pos_embed``, ``norm.*``, maybe ``decoder_*``/``mask_token``) lack timm's ``head`` and carry a decoder;
        the keys that fit the ViT are loaded and the ones the truncated forward needs must all be there.
        """
        field = "model.init_args.teacher_ckpt"
        check_checkpoint_exists(path, field)
        try:
            super().load_teacher(path, name)
            self._teacher_missing: list[str] = []
        except TeacherCheckpointError as exact_error:
            self._teacher_missing = self._load_matching_keys(path, field, exact_error)
        self._check_teacher_weights(path)

    def _load_matching_keys(self, path: str | Path, field: str, exact_error: Exception) -> list[str]:
        vit = as_vit(self.teacher, "teacher")
        own = vit.state_dict()
        raw = select_role(state_dict_of(read_checkpoint(path, field)), self.teacher_ckpt_key, field)
        state = {k.replace("_orig_mod.", ""): v for k, v in raw.items()}
        prefixes: Counter[str] = Counter()
        for key in state:
            parts = key.split(".")
            for i in range(len(parts)):
                if ".".join(parts[i:]) in own:
                    prefixes[".".join(parts[:i]) + ("." if i else "")] += 1
        if not prefixes:
            raise exact_error
        prefix = prefixes.most_common(1)[0][0]
        loaded = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix) :] in own}
        wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in loaded.items() if v.shape != own[k].shape]
        if wrong:
            raise TeacherCheckpointError(
                f"{field}={path} does not fit the teacher ViT: {', '.join(wrong[:4])}. Same embed_dim, patch_size "
                "and img_size as the checkpoint? (a pos_embed mismatch means another image size)"
            )
        vit.load_state_dict(loaded, strict=False)
        missing = sorted(set(own) - set(loaded))
        rank_zero_info(
            f"DMAE: loaded {len(loaded)} teacher tensors from {path} (prefix {prefix!r}); "
            f"{len(missing)} teacher tensors not in it, {len(state) - len(loaded)} checkpoint entries unused."
        )
        return missing

    def _check_teacher_weights(self, path: str | Path | None = None) -> None:
        """Every tensor the truncated teacher uses must have come from the checkpoint (after a partial load)."""
        missing = getattr(self, "_teacher_missing", None)
        if not missing or not hasattr(self, "teacher_stop"):
            return  # nothing loaded partially yet, or called from DistillationModule.__init__ (checked later)
        blocks = [f"blocks.{i}." for i in range(self.teacher_stop + 1)]
        used = ("patch_embed.", "cls_token", "reg_token", "pos_embed", "norm_pre.", *blocks)
        needed = [k for k in missing if k.startswith(used)]
        if needed:
            raise TeacherCheckpointError(
                f"model.init_args.teacher_ckpt={path or self.teacher_ckpt} lacks teacher weights that DMAE uses "
                f"(blocks up to {self.teacher_stop}): {', '.join(needed[:6])}{' ...' if len(needed) > 6 else ''}."
            )
