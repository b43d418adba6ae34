"""Source-side attribution maps of a seq2seq teacher: ``extract_attributions(teacher, batch, method) -> A [B, T, S]``.

Used by :class:`~kd_lightning.methods.attribution_nmt.AttributionGuidedNMT` (Nourbakhsh, Lamsiyah, Danilov,
Schommer, "Evaluating Explainable AI Attribution Methods in Neural Machine Translation via Attention-Guided
Knowledge Distillation", arXiv 2603.11342, 2026; journal version Cambridge University Press, May 2026).
Verified from the abstract (arxiv.org/abs/2603.11342 and the journal page; the body and the code were not
reachable): the maps are extracted with the Inseq library (which wraps captum) over source-target pairs and
compared across Attention, Value Zeroing, Layer Gradient x Activation, Saliency, Integrated Gradients,
DeepLIFT, Input x Gradient and GradientShap. RECONSTRUCTION (not verified, every choice is an argument):
which attention layer and heads, the aggregation over hidden dimensions (L2 norm), the IG/SHAP baselines,
the value-zeroing layers and distance, and the normalisation below. captum's DeepLift has rescale rules only
for some nn modules (ReLU, Sigmoid, Tanh, ...): on a GELU / functional-softmax transformer it equals
input x gradient with a zero baseline (as it would through Inseq).

Row ``t`` of ``A`` explains the teacher's prediction at target position ``t`` under teacher forcing of the
reference: the decoder input at ``t`` is ``decoder_input_ids[:, : t + 1]`` (BOS + ``y_<t``) and gradient
methods attribute ``log p(labels[:, t] | y_<t, x)`` to the source token embeddings (``[B, S, d]``), so no
row ever depends on a later target token (the decoder is causal). Methods:

- ``attention``: mean over heads (``heads``; all by default) of the cross-attention weights of ``layer``
  (default the last decoder layer).
- ``saliency`` (|gradient|), ``input_x_gradient``, ``integrated_gradients`` (``steps``, ``baseline``),
  ``deeplift``, ``gradient_shap`` (``shap_samples``, ``shap_stdev``): captum on the source embeddings,
  aggregated over the hidden dimension by the L2 norm.
- ``layer_gradient_x_activation``: captum's gradient x activation of the module ``attribution_layer``
  (default the encoder output), L2 norm over the hidden dimension.
- ``value_zeroing`` (Mohebbi et al., 2023): for each source token ``j``, the value vector of ``j`` is zeroed
  in the decoder's cross-attention (``value_zeroing_layers``) through the attention modules' ``value_scale``
  and the score is the cosine distance between the last decoder layer's output at ``t`` with and without it
  (TinySeq2Seq teachers only: the encoder runs once, the decoder once per real source token).
- ``uniform`` and ``random`` baselines of the same shape (no teacher needed).

Normalisation (:func:`normalise_attributions`): ``A = |A_raw|``, padding columns set to 0, each row divided by
its sum (a row with no mass, e.g. a padded target position, becomes uniform over the real source tokens).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDConfigError

__all__ = [
    "ATTRIBUTION_FIELD",
    "CAPTUM_METHODS",
    "METHODS",
    "available_methods",
    "check_map_shape",
    "extract_attributions",
    "normalise_attributions",
    "source_embedding_module",
]

#: The config field the method's ``attribution`` argument lives in (named by every error here).
ATTRIBUTION_FIELD = "model.init_args.attribution"
IGNORE_INDEX = -100

#: Methods that need captum, with the captum class each uses.
CAPTUM_METHODS: dict[str, str] = {
    "saliency": "Saliency",
    "input_x_gradient": "InputXGradient",
    "integrated_gradients": "IntegratedGradients",
    "deeplift": "DeepLift",
    "gradient_shap": "GradientShap",
    "layer_gradient_x_activation": "LayerGradientXActivation",
}
#: Every method name, in the order the paper lists them, then the baselines.
METHODS: tuple[str, ...] = (
    "attention",
    "value_zeroing",
    "layer_gradient_x_activation",
    "saliency",
    "integrated_gradients",
    "deeplift",
    "input_x_gradient",
    "gradient_shap",
    "uniform",
    "random",
)
#: Methods that never run the teacher.
TEACHER_FREE = frozenset({"uniform", "random"})


def _captum_attr() -> Any:
    try:
        import captum.attr as captum_attr
    except ImportError:  # pragma: no cover - captum is installed with the translation extra
        raise ImportError(
            "kd: error: gradient attribution methods need captum: pip install 'kd-lightning[translation]'"
        ) from None
    return captum_attr


def available_methods() -> list[str]:
    """The method names this installation supports (captum's methods only when captum has the class)."""
    try:
        captum_attr = _captum_attr()
    except ImportError:
        captum_attr = None
    return [m for m in METHODS if m not in CAPTUM_METHODS or hasattr(captum_attr, CAPTUM_METHODS[m])]


def check_method(method: str, field: str = ATTRIBUTION_FIELD) -> None:
    """Raise a one-line :class:`KDConfigError` unless ``method`` is known and supported here."""
    available = available_methods()
    if method in available:
        return
    if method in CAPTUM_METHODS:
        problem = f"{method!r} needs captum.attr.{CAPTUM_METHODS[method]}, which the installed captum lacks"
        fix = "pip install 'kd-lightning[translation]' (captum>=0.7) or use one of: " + ", ".join(available)
    else:
        problem = f"unknown attribution method {method!r}"
        fix = "use one of: " + ", ".join(available)
    raise KDConfigError(field, problem, fix)


# ---------------------------------------------------------------------------------------------- normalisation
def normalise_attributions(raw: Tensor, source_mask: Tensor, target_mask: Tensor | None = None) -> Tensor:
    """Row-stochastic maps: ``|raw|`` with padding columns 0, each row divided by its sum.

    Args:
        raw: ``[B, T, S]`` raw scores.
        source_mask: ``[B, S]`` (1/True = real source token).
        target_mask: ``[B, T]`` (1/True = a real target position); other rows become uniform.

    Returns:
        ``[B, T, S]`` float32, rows summing to 1 over the real source tokens; a row without mass (all zero, or a
        padded target position) is uniform over the real source tokens.
    """
    scores = raw.detach().float().abs().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    columns = source_mask.to(scores.device).bool()[:, None, :].expand_as(scores)
    scores = scores.masked_fill(~columns, 0.0)
    if target_mask is not None:
        scores = scores.masked_fill(~target_mask.to(scores.device).bool()[:, :, None], 0.0)
    uniform = columns.float() / columns.float().sum(-1, keepdim=True).clamp_min(1.0)
    total = scores.sum(-1, keepdim=True)
    empty = total <= torch.finfo(scores.dtype).tiny
    return torch.where(empty, uniform, scores / total.clamp_min(torch.finfo(scores.dtype).tiny))


def check_map_shape(maps: Tensor, batch: Mapping[str, Tensor], field: str = ATTRIBUTION_FIELD) -> None:
    """A map batch must be ``[B, T, S]`` with the batch's target and source lengths (one-line error otherwise)."""
    expected = (batch["input_ids"].shape[0], batch["decoder_input_ids"].shape[1], batch["input_ids"].shape[1])
    if maps.dim() != 3 or tuple(maps.shape) != expected:
        raise KDConfigError(
            field,
            f"the attribution maps have shape {tuple(maps.shape)} but the batch needs [B, T_tgt, T_src] = "
            f"{list(expected)}",
            "extract the maps for this data and tokenizer (delete the stale map cache so it is rebuilt)",
        )


# ---------------------------------------------------------------------------------------------- teacher plumbing
def _masks(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``(source_mask [B, S] bool, target_mask [B, T] bool)``: real source tokens and predicted positions."""
    input_ids = batch["input_ids"]
    source = batch.get("attention_mask")
    source = torch.ones_like(input_ids, dtype=torch.bool) if source is None else source.bool()
    labels = batch.get("labels")
    if labels is not None:
        target = labels != IGNORE_INDEX
    else:
        mask = batch.get("decoder_attention_mask")
        target = torch.ones_like(batch["decoder_input_ids"], dtype=torch.bool) if mask is None else mask.bool()
    return source, target


def _forward(teacher: nn.Module, batch: Mapping[str, Tensor], **kwargs: Any) -> Any:
    return teacher(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        decoder_input_ids=batch["decoder_input_ids"],
        decoder_attention_mask=batch.get("decoder_attention_mask"),
        **kwargs,
    )


def _logits(output: Any) -> Tensor:
    return output.logits if hasattr(output, "logits") else output


def source_embedding_module(teacher: nn.Module, batch: Mapping[str, Tensor]) -> nn.Module:
    """The ``nn.Embedding`` that embeds the source tokens (found by one probe forward: the embedding called on
    the batch's ``input_ids``)."""
    found: list[nn.Module] = []
    input_ids = batch["input_ids"]

    def probe(module: nn.Module, args: tuple[Any, ...]) -> None:
        if args and isinstance(args[0], Tensor) and (args[0] is input_ids) and not found:
            found.append(module)

    handles = [m.register_forward_pre_hook(probe) for m in teacher.modules() if isinstance(m, nn.Embedding)]
    try:
        with torch.no_grad():
            _forward(teacher, batch)
    finally:
        for handle in handles:
            handle.remove()
    if not found:  # a wrapper copied input_ids: take the first embedding called on equal values
        equal: list[nn.Module] = []

        def probe_equal(module: nn.Module, args: tuple[Any, ...]) -> None:
            candidate = args[0] if args and isinstance(args[0], Tensor) else None
            if candidate is not None and not equal and candidate.shape == input_ids.shape:
                equal.extend([module] if torch.equal(candidate.to(input_ids.device), input_ids) else [])

        handles = [m.register_forward_pre_hook(probe_equal) for m in teacher.modules() if isinstance(m, nn.Embedding)]
        try:
            with torch.no_grad():
                _forward(teacher, batch)
        finally:
            for handle in handles:
                handle.remove()
        found = equal
    if not found:
        raise KDConfigError(
            "model.init_args.teacher",
            f"{type(teacher).__name__} embeds its source tokens without an nn.Embedding called on input_ids",
            "use a TinySeq2Seq or HFSeq2SeqLM teacher for gradient attribution methods",
        )
    return found[0]


class _LogProbOfTargets(nn.Module):
    """``forward(source_embeds, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, labels)
    -> [N, T]``: the teacher's log-probability of each reference token under teacher forcing, with the source
    embeddings replaced by ``source_embeds`` (a forward hook on the source embedding module)."""

    def __init__(self, teacher: nn.Module, embedding: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher
        self._embedding = [embedding]  # not a submodule (it is inside the teacher already)
        self._override: tuple[Tensor, Tensor] | None = None

    def _replace(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        if self._override is not None and args and args[0] is self._override[0]:
            return self._override[1]
        return None

    def forward(
        self,
        source_embeds: Tensor | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        decoder_input_ids: Tensor,
        decoder_attention_mask: Tensor,
        labels: Tensor,
    ) -> Tensor:
        handle = self._embedding[0].register_forward_hook(self._replace)
        self._override = (input_ids, source_embeds) if source_embeds is not None else None
        try:
            logits = _logits(
                self.teacher(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    decoder_input_ids=decoder_input_ids,
                    decoder_attention_mask=decoder_attention_mask,
                )
            )
        finally:
            self._override = None
            handle.remove()
        targets = labels.clamp_min(0)
        return logits.float().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)


def _resolve_module(root: nn.Module, path: str, field: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in root.named_modules() if n and n.count(".") < 2][:12]
        raise KDConfigError(
            field, f"{type(root).__name__} has no module {path!r}", "use a module path such as " + ", ".join(names)
        ) from None


def default_attribution_layer(teacher: nn.Module) -> nn.Module:
    """The module whose output is the encoder output: ``teacher.encoder_norm`` (TinySeq2Seq: the memory the decoder
    attends to), else the last layer of the (wrapped HF) model's encoder."""
    norm = getattr(teacher, "encoder_norm", None)
    if isinstance(norm, nn.Module):
        return norm
    for candidate in (teacher, getattr(teacher, "model", None)):
        if candidate is None:
            continue
        encoder = candidate.get_encoder() if hasattr(candidate, "get_encoder") else getattr(candidate, "encoder", None)
        if isinstance(encoder, nn.Module):
            layers = getattr(encoder, "layers", None)  # HF encoders return a ModelOutput: take the last layer's output
            return layers[-1] if isinstance(layers, nn.ModuleList) and len(layers) else encoder
    raise KDConfigError(
        "model.init_args.attribution_layer",
        f"{type(teacher).__name__} has no 'encoder' module for layer_gradient_x_activation",
        "name the teacher module to attribute through (a module path)",
    )


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


# ---------------------------------------------------------------------------------------------- extraction
def extract_attributions(
    teacher: nn.Module | None,
    batch: Mapping[str, Tensor],
    method: str = "attention",
    *,
    layer: int = -1,
    heads: list[int] | None = None,
    steps: int = 16,
    baseline: str = "zeros",
    shap_samples: int = 8,
    shap_stdev: float = 0.09,
    attribution_layer: str | None = None,
    value_zeroing_layers: str | list[int] = "all",
    internal_batch_size: int | None = 512,
    seed: int = 0,
    normalise: bool = True,
) -> Tensor:
    """The teacher's source attribution map of each target position of ``batch`` (see the module docstring).

    Args:
        teacher: the seq2seq teacher (``forward(input_ids, attention_mask, decoder_input_ids,
            decoder_attention_mask, output_attentions=...)``); unused (may be ``None``) for uniform/random.
        batch: a translation batch (``input_ids``, ``attention_mask``, ``decoder_input_ids``, ``labels``, ...).
        method: one of :data:`METHODS`.
        layer: ``attention``: the decoder layer whose cross-attention is read (``-1`` = last).
        heads: ``attention``: the heads averaged (``None`` = all).
        steps: ``integrated_gradients``: Riemann steps.
        baseline: ``integrated_gradients``/``deeplift``/``gradient_shap``: ``"zeros"`` (zero embeddings) or
            ``"pad"`` (the pad token's embedding, ``pad_token_id`` 0 unless the batch says otherwise).
        shap_samples: ``gradient_shap``: samples per example. shap_stdev: its input noise.
        attribution_layer: ``layer_gradient_x_activation``: teacher module path (``None`` = the encoder).
        value_zeroing_layers: ``value_zeroing``: ``"all"`` or decoder layer indices whose cross-attention value
            vectors are zeroed.
        internal_batch_size: rows per captum forward (memory bound); ``None``: all at once.
        seed: ``random`` maps and ``gradient_shap`` sampling.
        normalise: ``False`` returns the raw scores (for inspection and tests).

    Returns:
        ``[B, T, S]`` (``T`` = ``decoder_input_ids`` length, ``S`` = ``input_ids`` length); normalised rows sum
        to 1 over the real source tokens and padding columns are 0.

    Raises:
        KDConfigError: an unknown method (naming ``model.init_args.attribution`` and the available ones), a
            teacher that cannot run the method.
    """
    check_method(method)
    source_mask, target_mask = _masks(batch)
    bsz, tgt_len, src_len = (
        batch["input_ids"].shape[0],
        batch["decoder_input_ids"].shape[1],
        batch["input_ids"].shape[1],
    )
    device = batch["input_ids"].device
    if method == "uniform":
        raw = torch.ones(bsz, tgt_len, src_len, device=device)
    elif method == "random":
        generator = torch.Generator().manual_seed(seed)
        raw = torch.rand(bsz, tgt_len, src_len, generator=generator).to(device)
    else:
        if teacher is None:
            raise KDConfigError("model.init_args.teacher", f"attribution {method!r} needs a teacher", "give one")
        with (
            _eval_mode(teacher),
            torch.enable_grad() if method not in ("attention", "value_zeroing") else torch.no_grad(),
        ):
            if method == "attention":
                raw = _attention(teacher, batch, layer, heads)
            elif method == "value_zeroing":
                raw = _value_zeroing(teacher, batch, value_zeroing_layers, internal_batch_size)
            else:
                raw = _captum(
                    teacher,
                    batch,
                    method,
                    steps=steps,
                    baseline=baseline,
                    shap_samples=shap_samples,
                    shap_stdev=shap_stdev,
                    attribution_layer=attribution_layer,
                    internal_batch_size=internal_batch_size,
                    seed=seed,
                )
    raw = raw.detach().float()
    if not normalise:
        return raw.abs()
    return normalise_attributions(raw, source_mask, target_mask)


def _attention(teacher: nn.Module, batch: Mapping[str, Tensor], layer: int, heads: list[int] | None) -> Tensor:
    output = _forward(teacher, batch, output_attentions=True)
    cross = getattr(output, "cross_attentions", None)
    if not cross:
        raise KDConfigError(
            "model.init_args.teacher",
            f"{type(teacher).__name__} returns no cross_attentions",
            "use a TinySeq2Seq or HFSeq2SeqLM teacher (eager attention)",
        )
    if not -len(cross) <= layer < len(cross):
        raise KDConfigError(
            "model.init_args.attention_layer",
            f"is {layer} but the teacher has {len(cross)} decoder layers",
            f"use an index in [-{len(cross)}, {len(cross) - 1}]",
        )
    weights = cross[layer]  # [B, H, T, S]
    if heads is not None:
        bad = [h for h in heads if not -weights.shape[1] <= h < weights.shape[1]]
        if bad or not heads:
            raise KDConfigError(
                "model.init_args.attention_heads",
                f"is {heads} but the teacher's cross-attention has {weights.shape[1]} heads",
                f"use head indices in [0, {weights.shape[1] - 1}] or null for all",
            )
        weights = weights[:, heads]
    return weights.float().mean(1)


def _cross_attention_modules(teacher: nn.Module, layers: str | list[int]) -> list[nn.Module]:
    """The decoder's cross-attention modules with a ``value_scale`` attribute (TinySeq2Seq only)."""
    getter = getattr(teacher, "attention_modules", None)
    modules = list(getter("cross")) if callable(getter) else []
    api = all(callable(getattr(teacher, name, None)) for name in ("encode", "decode"))
    if not api or not modules or not all(hasattr(m, "value_scale") for m in modules):
        raise KDConfigError(
            ATTRIBUTION_FIELD,
            f"'value_zeroing' needs a TinySeq2Seq teacher (cross-attention with value_scale), got "
            f"{type(teacher).__name__}",
            "use another attribution method for this teacher",
        )
    if layers == "all":
        return modules
    if isinstance(layers, str) or any(not -len(modules) <= i < len(modules) for i in layers):
        raise KDConfigError(
            "model.init_args.value_zeroing_layers",
            f"is {layers!r} but the teacher has {len(modules)} decoder layers",
            f"use 'all' or indices in [0, {len(modules) - 1}]",
        )
    return [modules[i] for i in layers]


def _value_zeroing(
    teacher: nn.Module, batch: Mapping[str, Tensor], layers: str | list[int], internal_batch_size: int | None
) -> Tensor:
    modules = _cross_attention_modules(teacher, layers)
    bsz, src_len = batch["input_ids"].shape
    source_mask, _ = _masks(batch)
    decoder_mask = batch.get("decoder_attention_mask")
    # The encoder output does not depend on the decoder's value vectors: encode once, re-run only the decoder.
    memory, _, _ = teacher.encode(batch["input_ids"], source_mask)
    _, hidden, _, _ = teacher.decode(memory, source_mask, batch["decoder_input_ids"], decoder_mask)
    reference = hidden[-1]  # [B, T, d]: the last decoder layer's output
    raw = torch.zeros(bsz, src_len, reference.shape[1], device=reference.device)
    pairs = source_mask.nonzero()  # (example, real source token) pairs: zero that token's value vector
    chunk = max(1, internal_batch_size or pairs.shape[0])
    try:
        for start in range(0, pairs.shape[0], chunk):
            b, j = pairs[start : start + chunk].unbind(1)
            scale = torch.ones(b.numel(), src_len, device=reference.device)
            scale[torch.arange(b.numel(), device=scale.device), j] = 0.0
            for module in modules:
                module.value_scale = scale
            _, zeroed, _, _ = teacher.decode(
                memory[b],
                source_mask[b],
                batch["decoder_input_ids"][b],
                None if decoder_mask is None else decoder_mask[b],
            )
            distance = 1.0 - F.cosine_similarity(zeroed[-1].float(), reference[b].float(), dim=-1, eps=1e-12)
            raw[b, j] = distance.clamp_min(0.0)  # [n, T]
    finally:
        for module in modules:
            module.value_scale = None
    return raw.transpose(1, 2)  # [B, T, S]


def _captum(
    teacher: nn.Module,
    batch: Mapping[str, Tensor],
    method: str,
    *,
    steps: int,
    baseline: str,
    shap_samples: int,
    shap_stdev: float,
    attribution_layer: str | None,
    internal_batch_size: int | None,
    seed: int,
) -> Tensor:
    captum_attr = _captum_attr()
    embedding = source_embedding_module(teacher, batch)
    wrapper = _LogProbOfTargets(teacher, embedding)
    bsz, src_len = batch["input_ids"].shape
    tgt_len = batch["decoder_input_ids"].shape[1]
    device = batch["input_ids"].device
    # Position t is attributed with the decoder cut to its prefix (BOS + y_<t): the teacher never sees a later
    # target token, and the cut saves the decoder work of the later positions. Padded positions are skipped.
    source_mask, target_mask = _masks(batch)
    decoder_mask = batch.get("decoder_attention_mask")
    if decoder_mask is None:
        decoder_mask = torch.ones_like(batch["decoder_input_ids"])
    labels = batch.get("labels", batch["decoder_input_ids"])
    raw = torch.zeros(bsz, tgt_len, src_len, device=device)
    chunk = max(1, (internal_batch_size or 1 << 30) // _expansion(method, steps, shap_samples))
    layer_module = None
    if method == "layer_gradient_x_activation":
        layer_module = (
            default_attribution_layer(teacher)
            if attribution_layer is None
            else _resolve_module(teacher, attribution_layer, "model.init_args.attribution_layer")
        )
    numpy_state = np.random.get_state()  # captum draws GradientShap's baselines and alphas from numpy
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"Setting forward, backward hooks and attributes on non-linear")
            torch.manual_seed(seed)
            np.random.seed(seed)
            for t in range(tgt_len):
                rows_t = target_mask[:, t].nonzero().flatten()
                for start in range(0, rows_t.numel(), chunk):
                    rows = rows_t[start : start + chunk]
                    part = (
                        batch["input_ids"][rows],
                        source_mask[rows].long(),
                        batch["decoder_input_ids"][rows, : t + 1],
                        decoder_mask[rows, : t + 1],
                        labels[rows, : t + 1],
                    )
                    attr = _captum_call(
                        captum_attr,
                        wrapper,
                        embedding,
                        layer_module,
                        method,
                        part,
                        t,
                        steps,
                        baseline,
                        batch,
                        shap_samples,
                        shap_stdev,
                    )
                    if attr.dim() != 3 or attr.shape[1] != src_len:
                        raise KDConfigError(
                            "model.init_args.attribution_layer",
                            f"the attributed module's output has shape {tuple(attr.shape)}, not [N, {src_len}, d]",
                            "attribute through a module whose output has one vector per source token (the encoder)",
                        )
                    raw[rows, t] = attr.detach().float().norm(dim=-1)  # L2 over the hidden dimension
    finally:
        np.random.set_state(numpy_state)
    return raw


def _captum_call(
    captum_attr: Any,
    wrapper: nn.Module,
    embedding: nn.Module,
    layer_module: nn.Module | None,
    method: str,
    part: tuple[Tensor, ...],
    t: int,
    steps: int,
    baseline: str,
    batch: Mapping[str, Any],
    shap_samples: int,
    shap_stdev: float,
) -> Tensor:
    """One captum attribution of ``log p(y_t)`` for the rows of ``part`` -> ``[n, S, d]``."""
    with torch.no_grad():
        embeds = embedding(part[0]).detach()
    if layer_module is not None:
        attr = captum_attr.LayerGradientXActivation(wrapper, layer_module).attribute(
            embeds, target=t, additional_forward_args=part
        )
    else:
        embeds.requires_grad_(True)
        algo = getattr(captum_attr, CAPTUM_METHODS[method])(wrapper)
        if method == "saliency":
            attr = algo.attribute(embeds, target=t, additional_forward_args=part, abs=True)
        elif method == "input_x_gradient":
            attr = algo.attribute(embeds, target=t, additional_forward_args=part)
        else:
            base = _baseline(embedding, part[0], baseline, batch)
            if method == "integrated_gradients":
                attr = algo.attribute(embeds, baselines=base, target=t, additional_forward_args=part, n_steps=steps)
            elif method == "deeplift":
                attr = algo.attribute(embeds, baselines=base, target=t, additional_forward_args=part)
            else:  # gradient_shap
                attr = algo.attribute(
                    embeds,
                    baselines=base[:1],
                    target=t,
                    additional_forward_args=part,
                    n_samples=shap_samples,
                    stdevs=shap_stdev,
                )
    return attr[0] if isinstance(attr, (tuple, list)) else attr


def _expansion(method: str, steps: int, shap_samples: int) -> int:
    return {"integrated_gradients": steps, "gradient_shap": shap_samples, "deeplift": 2}.get(method, 1)


def _baseline(embedding: nn.Module, input_ids: Tensor, kind: str, batch: Mapping[str, Any]) -> Tensor:
    if kind == "zeros":
        with torch.no_grad():
            return torch.zeros_like(embedding(input_ids[:, :1])).expand(-1, input_ids.shape[1], -1).contiguous()
    if kind == "pad":
        pad = int(batch.get("pad_token_id", 0)) if not isinstance(batch.get("pad_token_id"), Tensor) else 0
        with torch.no_grad():
            return embedding(torch.full_like(input_ids, pad)).detach()
    raise KDConfigError("model.init_args.baseline", f"must be 'zeros' or 'pad', got {kind!r}", "use 'zeros'")
