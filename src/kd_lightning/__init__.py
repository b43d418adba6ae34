"""kd-lightning: knowledge distillation methods as PyTorch Lightning modules.

Losses live in :mod:`kd_lightning.losses` (plain torch), methods in :mod:`kd_lightning.methods`
(LightningModules), networks in :mod:`kd_lightning.models`, data modules in :mod:`kd_lightning.data`.
"""

__version__ = "0.1.0"
