"""The llamacpp.dev API types (pydantic) and the CRDs generated from them; the package itself is v1beta1."""

from .v1beta1 import *  # noqa: F403
from .v1beta1 import API_VERSION, GROUP, VERSION  # noqa: F401
