"""LlamaModel: where a GGUF comes from (one of three sources), its checksum, its cache, and the object."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..base import ApiModel, Quantity
from ..bounds import PATH_MAX_LENGTH, SHORT_TEXT_MAX_LENGTH, URL_MAX_LENGTH, Name
from ..cel import Rule, cel_schema, check_value, snake
from .llamamodel_status import LlamaModelStatus
from .shared_types import (
    API_VERSION,
    DNS_SUBDOMAIN,
    SHA256_HEX,
    ObjectMeta,
    SecretKeyRef,
    SecretRef,
)

GGUF_FILE_RULES = (
    Rule("relative-path",
         "!self.startsWith('/') && self != '..' && !self.startsWith('../') && !self.contains('/../') "
         "&& !self.endsWith('/..')",
         lambda v: not v.startswith("/") and ".." not in v.split("/"),
         "must be a relative path inside the repository or volume, without '..'"),
    Rule("gguf-file", "self.endsWith('.gguf')", lambda v: v.endswith(".gguf"),
         "must name a .gguf file (for a split model, its first shard: name-00001-of-0000N.gguf)"),
)
"""A GGUF file inside a repository or volume (huggingFace.file, volume.path)."""


class HuggingFaceSource(ApiModel):
    """A GGUF file in a Hugging Face model repository."""

    repo: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=SHORT_TEXT_MAX_LENGTH,
        description="Repository id, e.g. Qwen/Qwen2.5-0.5B-Instruct-GGUF.",
    )
    file: str = Field(
        min_length=6,
        max_length=1024,
        description="Path of the .gguf file in the repository; for a split model its first shard "
        "(name-00001-of-0000N.gguf) and every shard is fetched.",
        json_schema_extra=cel_schema(GGUF_FILE_RULES),
    )
    revision: str = Field("main", min_length=1, max_length=SHORT_TEXT_MAX_LENGTH,
                          description="Branch, tag or commit (default main).")
    token_secret_ref: SecretKeyRef | None = Field(
        None, description="Secret key holding a Hugging Face token, for gated or private repositories."
    )

    _file = field_validator("file")(classmethod(lambda cls, v: check_value(GGUF_FILE_RULES, v)))


class HttpSource(ApiModel):
    """A GGUF file at a plain HTTP(S) URL."""

    url: str = Field(pattern=r"^https?://[^\s]+$", max_length=URL_MAX_LENGTH,
                     description="http:// or https:// URL of the .gguf file.")
    headers_secret_ref: SecretRef | None = Field(
        None,
        description="Secret whose keys are HTTP header names and values their values (e.g. Authorization), "
        "sent with every request.",
    )


class VolumeSource(ApiModel):
    """A GGUF file already present on an existing PersistentVolumeClaim: nothing is downloaded."""

    persistent_volume_claim: str = Field(
        pattern=DNS_SUBDOMAIN, max_length=253, description="Name of the PVC in the same namespace."
    )
    path: str = Field(min_length=6, max_length=1024, description="Path of the .gguf file inside the volume.",
                      json_schema_extra=cel_schema(GGUF_FILE_RULES))

    _path = field_validator("path")(classmethod(lambda cls, v: check_value(GGUF_FILE_RULES, v)))


SOURCE_KINDS = ("huggingFace", "http", "volume")
# The names of the sources that are set, comma-separated, or 'none' (no `join`: its cost estimate is unbounded).
_GIVEN = " && ".join(f"!has(self.{kind})" for kind in SOURCE_KINDS) + " ? 'none' : " + " + ".join(
    f"(has(self.{kind}) ? " + ("(" + " || ".join(f"has(self.{k})" for k in SOURCE_KINDS[:i]) + " ? ', ' : '') + "
                               if i else "") + f"'{kind}' : '')"
    for i, kind in enumerate(SOURCE_KINDS))

SOURCE_RULES = (
    Rule("one-source", "size([has(self.huggingFace), has(self.http), has(self.volume)].filter(s, s)) == 1",
         lambda s: len(s.given) == 1,
         "exactly one of huggingFace, http, volume must be set (got {given})",
         values={"given": (_GIVEN, lambda s: ", ".join(s.given) or "none")}),
)


class ModelSource(ApiModel):
    """Where the model comes from: exactly one of huggingFace, http, volume."""

    model_config = {**ApiModel.model_config, "json_schema_extra": cel_schema(SOURCE_RULES)}

    hugging_face: HuggingFaceSource | None = Field(None, description="A file in a Hugging Face repository.")
    http: HttpSource | None = Field(None, description="A plain HTTP(S) URL.")
    volume: VolumeSource | None = Field(None, description="A file on an existing PersistentVolumeClaim.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        return check_value(SOURCE_RULES, self)

    @property
    def given(self) -> list[str]:
        """The sources that are set (exactly one in a valid object)."""
        return [name for name in SOURCE_KINDS if getattr(self, snake(name)) is not None]

    @property
    def kind(self) -> Literal["huggingFace", "http", "volume"]:
        if self.hugging_face is not None:
            return "huggingFace"
        if self.http is not None:
            return "http"
        return "volume"

    @property
    def file_name(self) -> str:
        """Base name of the (first) GGUF file."""
        if self.hugging_face is not None:
            path = self.hugging_face.file
        elif self.http is not None:
            path = self.http.url.split("?", 1)[0]
        else:
            assert self.volume is not None
            path = self.volume.path
        return path.rstrip("/").rsplit("/", 1)[-1]


CacheType = Literal["EmptyDir", "PersistentVolumeClaim", "HostPath"]

HOST_PATH_CHARACTERS = r"^[A-Za-z0-9._/-]+$"
HOST_PATH_RULES = (
    Rule("host-path-relative",
         "!self.startsWith('/') && self != '..' && !self.startsWith('../') && !self.contains('/../') "
         "&& !self.endsWith('/..') && self != '.' && !self.startsWith('./') && !self.contains('/./') "
         "&& !self.endsWith('/.') && !self.contains('//')",
         lambda v: not v.startswith("/") and not {".", "..", ""} & set(v.rstrip("/").split("/")),
         "must be a relative directory below the operator's HostPath root, without '.', '..' or '//' "
         "(e.g. team-a/llm)"),
    Rule("host-path-characters", f"self.matches('{HOST_PATH_CHARACTERS}')",
         lambda v: re.match(HOST_PATH_CHARACTERS, v) is not None,
         "may hold letters, digits, '.', '_', '-' and '/' only"),
)
"""cache.path: the node directory is always <root>/<path>, never outside the root the chart configures."""


class CacheSpec(ApiModel):
    """Where downloaded files are kept between pod starts."""

    type: CacheType | None = Field(
        None,
        description="EmptyDir (per pod, lost with it), PersistentVolumeClaim (created and owned by the "
        "LlamaModel; ReadWriteMany lets replicas spread across nodes, ReadWriteOnce pins them to one node) or "
        "HostPath (node-local directory shared by every pod on that node). Default: the operator's setting.",
    )
    size: Quantity | None = Field(
        None, description="Volume size (EmptyDir size limit or PVC request), also the most a download of unknown "
        "size may write. Default: the model's size with its projector plus 10% and 1 GiB; an EmptyDir of a model "
        "whose size is unknown gets room for the fetcher's 64 GiB cap.",
    )
    storage_class_name: Name | None = Field(None, description="StorageClass of the PVC (default: the cluster's).")
    access_modes: list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod", "ReadOnlyMany"]] | None = (
        Field(None, max_length=4, description="PVC access modes (default ReadWriteOnce).")
    )
    path: str | None = Field(
        None,
        min_length=1,
        max_length=PATH_MAX_LENGTH,
        description="HostPath only: a directory below the operator's HostPath root (LLAMA_OPERATOR_HOSTPATH_ROOT), "
        "relative, without '..', e.g. team-a/llm; default: the root itself. Caches that name the same directory "
        "share their downloads.",
        json_schema_extra=cel_schema(HOST_PATH_RULES),
    )

    _path = field_validator("path")(classmethod(lambda cls, v: v if v is None else check_value(HOST_PATH_RULES, v)))


class MmprojSpec(ApiModel):
    """A multimodal projector (mmproj) GGUF next to the weights: llama-server gets `--mmproj` and accepts images
    (or audio) in chat messages. Fetched and verified like the weights, into the same cache directory."""

    file: str = Field(
        min_length=6, max_length=1024,
        description="huggingFace: path of the projector in the same repository and revision; volume: path in the "
        "same PVC; http: a URL relative to the model's URL (a bare file name is the same directory) or a whole "
        "http(s) URL.",
        json_schema_extra=cel_schema(GGUF_FILE_RULES))
    sha256: str | None = Field(
        None, pattern=SHA256_HEX, max_length=64,
        description="Expected sha256, lowercase hex. Optional where the source publishes it (Hugging Face LFS); "
        "a downloaded projector whose sha256 nobody publishes or pins is refused.")

    _file = field_validator("file")(classmethod(lambda cls, v: check_value(GGUF_FILE_RULES, v)))

    @property
    def file_name(self) -> str:
        """Base name of the projector file (in the cache directory or the volume)."""
        return self.file.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


class LlamaModelSpec(ApiModel):
    """A GGUF model: where it comes from, its checksum, how it is cached."""

    source: ModelSource = Field(description="Where the GGUF comes from: exactly one of huggingFace, http, volume.")
    sha256: str | None = Field(
        None,
        pattern=SHA256_HEX,
        max_length=64,
        description="Expected sha256 of the (first) file, lowercase hex. Optional: Hugging Face publishes it for "
        "LFS files and that is used when absent.",
    )
    cache: CacheSpec = Field(default_factory=CacheSpec, description="How downloaded files are cached.")
    mmproj: MmprojSpec | None = Field(
        None, description="A multimodal projector file for vision models (llama-server --mmproj).")
    adapter_for: str | None = Field(
        None, pattern=DNS_SUBDOMAIN, max_length=253,
        description="This GGUF is a LoRA adapter (general.type adapter, adapter.type lora) of the named "
        "LlamaModel (same namespace): a LlamaServer of that model serves it under spec.adapters. Its header is "
        "checked as an adapter, and its architecture against the base's (docs/adapters.md).")


class LlamaModel(ApiModel):
    """A LlamaModel object as stored in the API."""

    model_config = {**ApiModel.model_config, "extra": "ignore"}

    api_version: Literal["llamacpp.dev/v1alpha1"] = API_VERSION
    kind: Literal["LlamaModel"] = "LlamaModel"
    metadata: ObjectMeta
    spec: LlamaModelSpec
    status: LlamaModelStatus = Field(default_factory=LlamaModelStatus)

    @property
    def first_file(self) -> str:
        """Name of the (first) GGUF file in its cache directory: as resolved (status.files), else the source's."""
        return self.status.files[0].name if self.status.files else self.spec.source.file_name
