"""Simulated environments of the embodied zoo (BabyAI via minigrid, Crafter), each with a scripted privileged
expert that labels every state at every level of the task hierarchy; see :mod:`kd_lightning.data.envs.common`
for the contract. The simulators are optional: ``pip install 'kd-lightning[embodied]'``."""

from kd_lightning.data.envs.common import OBSERVATION_KEYS, Hierarchy, MissionVocabulary, factor_names, factor_sizes

__all__ = ["OBSERVATION_KEYS", "Hierarchy", "MissionVocabulary", "factor_names", "factor_sizes"]
