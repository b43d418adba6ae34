"""The teacher lifecycle: train-if-missing with the method's own task, cache keys, and teacher-logit stores.

Loading a checkpoint into a network is pure torch and lives in :mod:`kd_lightning.models.checkpoints`.
"""

from kd_lightning.teachers.fingerprint import data_fingerprint_config, fingerprint, resolved
from kd_lightning.teachers.logit_cache import ViewLogitStore, cache_key, teacher_digest
from kd_lightning.teachers.training import CachedTeacher, TeacherTraining, reset_parameters

__all__ = [
    "CachedTeacher",
    "TeacherTraining",
    "ViewLogitStore",
    "cache_key",
    "data_fingerprint_config",
    "fingerprint",
    "reset_parameters",
    "resolved",
    "teacher_digest",
]
