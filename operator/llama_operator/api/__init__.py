"""The llamacpp.dev API types (pydantic) and the CRDs generated from them."""

from .v1alpha1 import *  # noqa: F403
from .v1alpha1 import API_VERSION, GROUP, VERSION  # noqa: F401
