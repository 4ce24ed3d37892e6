"""Pure builders: typed LlamaModel/LlamaServer + Settings -> Kubernetes object dicts.

No API client, no globals, no clock: the same inputs always give the same objects, which is what makes
server-side apply converge and what the golden-file tests pin down. `plan.py` decides what a LlamaServer gets.
"""

from .objects import owner_reference
from .plan import build_deployment
from .pvc import build_cache_pvc
from .service import build_service

__all__ = ["build_cache_pvc", "build_deployment", "build_service", "owner_reference"]
