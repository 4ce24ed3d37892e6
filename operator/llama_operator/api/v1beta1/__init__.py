"""The llamacpp.dev/v1beta1 API: the served and stored version of LlamaModel and LlamaServer.

v1beta1 is v1alpha1 plus the changes docs/api.md ("What v1beta1 changes") names with their reasons; every type
whose schema did not change is v1alpha1's own class, re-exported here, so the two versions cannot drift apart
by accident. The operator reads and writes this version; api/conversion.py converts to and from v1alpha1.
`from llama_operator.api.v1beta1 import LlamaModel, LlamaServer, ...`.
"""

from ..v1alpha1 import *  # noqa: F403
from ..v1alpha1 import SOURCE_KINDS  # noqa: F401
from .types import API_VERSION, VERSION, LlamaModel, LlamaModelStatus, LlamaServer, human_size  # noqa: F401
