"""Pure helpers shared by every layer: content fingerprints and a restricted unpickler."""

from kd_lightning.utils.fingerprint import json_digest, module_digest, update_with_tensor
from kd_lightning.utils.safe_pickle import UnsafePickleError, restricted_load

__all__ = ["UnsafePickleError", "json_digest", "module_digest", "restricted_load", "update_with_tensor"]
