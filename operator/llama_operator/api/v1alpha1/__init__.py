"""The llamacpp.dev/v1alpha1 API: LlamaModel and LlamaServer spec and status, one module per kind.

These pydantic models are the single source of truth: the CRDs (`llama-operator crds`), the admission
checks and the builders all derive from them. Everything is re-exported here:
`from llama_operator.api.v1alpha1 import LlamaModel, LlamaServer, ...`.
"""

from .llamamodel_status import *  # noqa: F403
from .llamamodel_types import *  # noqa: F403
from .llamamodel_types import SOURCE_KINDS  # noqa: F401
from .llamaserver_distributed import *  # noqa: F403
from .llamaserver_fleet import *  # noqa: F403
from .llamaserver_rules import *  # noqa: F403
from .llamaserver_status import *  # noqa: F403
from .llamaserver_types import *  # noqa: F403
from .shared_types import *  # noqa: F403
