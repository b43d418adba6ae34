"""Shared base for the CIFAR zoo: stage names for feature taps and checkpoint-key compatibility."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn


class CifarModel(nn.Module):
    """Base class of the CIFAR zoo (pure torch).

    Every subclass ends in an ``nn.Linear`` called ``fc`` and describes its intermediate features by
    submodule name so that feature-distillation methods can tap them with
    :class:`kd_lightning.models.FeatureTaps` without touching ``forward``:

    * ``feature_stages`` (class attribute): names whose *outputs* are the stage features, matching the
      ``feats`` list of RepDistiller's ``forward(x, is_feat=True)`` (post-activation features, the last
      one being the pooled, flattened vector that feeds ``fc``).
    * ``preact_stages`` (instance attribute): the same stages before their final ReLU, as tap names
      (``"<module>:input"`` for the input of a ReLU module), matching RepDistiller's ``preact=True``.
    * ``feature_dims``: channel count of each stage (the length of the vector for the pooled stage).
    * ``classifier_in_features``: ``fc.in_features``.
    * ``bn_before_relu``: names of the BatchNorm layers whose outputs are the pre-activations that
      RepDistiller's ``get_bn_before_relu()`` returns (used by OFD); empty where unsupported.

    Parameter names follow RepDistiller / mdistiller, except that their classifier (``classifier``,
    ``classifier.0`` or ``linear``) is called ``fc`` here; state dicts saved with the old classifier
    name are renamed on ``load_state_dict``, so their published CIFAR-100 teachers load as they are.
    No module runs in place, so a tapped tensor is never overwritten later in the forward.
    """

    feature_stages: ClassVar[tuple[str, ...]] = ()
    #: classifier prefix used by RepDistiller / mdistiller for this family, renamed to ``fc.`` on load.
    legacy_classifier_prefix: ClassVar[str | None] = None

    preact_stages: tuple[str, ...]
    feature_dims: tuple[int, ...]
    classifier_in_features: int
    bn_before_relu: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        if self.legacy_classifier_prefix is not None:
            self.register_load_state_dict_pre_hook(_rename_legacy_classifier)

    def stage_channels(self) -> dict[str, int]:
        """``{stage name: channels}`` for ``feature_stages``."""
        return dict(zip(self.feature_stages, self.feature_dims))

    def get_bn_before_relu(self) -> list[nn.Module]:
        """The BatchNorm modules named by ``bn_before_relu`` (RepDistiller API, used by OFD)."""
        if not self.bn_before_relu:
            raise NotImplementedError(f"{type(self).__name__} has no BN-before-ReLU stages (as in RepDistiller)")
        return [self.get_submodule(name) for name in self.bn_before_relu]

    def _finish(self, preact_stages: tuple[str, ...], feature_dims: tuple[int, ...]) -> None:
        """Record stage metadata at the end of a subclass ``__init__`` and check it."""
        self.preact_stages = preact_stages
        self.feature_dims = feature_dims
        self.classifier_in_features = self.fc.in_features
        assert len(preact_stages) == len(feature_dims) == len(self.feature_stages), type(self).__name__


def _rename_legacy_classifier(module: CifarModel, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    old = prefix + str(module.legacy_classifier_prefix)
    for key in [k for k in state_dict if k.startswith(old)]:
        new = prefix + "fc." + key[len(old) :]
        if new not in state_dict:
            state_dict[new] = state_dict.pop(key)
