"""The v1beta1 types that differ from v1alpha1: the version itself, and LlamaModel's status.humanSize."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .. import v1alpha1
from ..v1alpha1 import GROUP

VERSION = "v1beta1"
API_VERSION = f"{GROUP}/{VERSION}"

_UNITS = ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei")


def human_size(size: int) -> str:
    """Bytes the way Kubernetes quantities read: `512`, `300Mi`, `1.2Gi` (binary units, at most one decimal)."""
    if size < 1024:
        return str(size)
    value, unit = float(size), ""
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            break
    text = f"{value:.1f}".removesuffix(".0")
    if text == "1024":  # 1023.96Mi rounds up to the next unit rather than printing 1024Mi
        return human_size(1024 ** (_UNITS.index(unit) + 2))
    return text + unit


class LlamaModelStatus(v1alpha1.LlamaModelStatus):
    """What the operator knows about the model."""

    human_size: str | None = Field(
        None, max_length=16,
        description="status.size for people (1.2Gi): what the SIZE column of `kubectl get llamamodels` shows. "
        "Derived from size; the operator writes it with every status.")

    @model_validator(mode="after")
    def _derive_human_size(self) -> LlamaModelStatus:
        # Derived, never set on its own: a status parsed or built with a size always carries the matching text.
        self.human_size = None if self.size is None else human_size(self.size)
        return self


class LlamaModel(v1alpha1.LlamaModel):
    """A LlamaModel object as stored in the API."""

    api_version: Literal["llamacpp.dev/v1beta1"] = API_VERSION  # type: ignore[assignment]
    status: LlamaModelStatus = Field(default_factory=LlamaModelStatus)


class LlamaServer(v1alpha1.LlamaServer):
    """A LlamaServer object as stored in the API."""

    api_version: Literal["llamacpp.dev/v1beta1"] = API_VERSION  # type: ignore[assignment]
