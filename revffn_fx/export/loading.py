"""Loading a RevModel directory (:func:`load`, ``rf.load``) and the ``auto_map`` entry
points its config names (:class:`RevFFNForCausalLM`, :class:`RevFFNConfig`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..model import RevModel
from ..serialization.rebuilding import rebuild


def load(out_dir: str | os.PathLike[str], *, dtype: torch.dtype | str | None = None,
         passes: Sequence[Any] | None = None, check_files: bool = True,
         experts_implementation: str | None = None) -> RevModel:
    """Load a directory written by :func:`transform_dir` or :func:`save` (eval mode).

    The base model is loaded by ``from_pretrained`` (its own key conversions), the
    transform is replayed with the recorded options, then the adapters are loaded; the
    result computes bit for bit what was saved. ``dtype`` overrides the stored dtype.
    ``check_files``: compare config.json's fields, the shim and every weight file with the
    sha256 record written with them (a LoadError names what changed; a missing or
    malformed record is refused); reads the weights once more. ``experts_implementation``
    (``"eager"``, ``"grouped_mm"``, ...) goes to ``from_pretrained`` (default: transformers'
    choice; eager for a float64 model, which grouped_mm cannot run on the CPU).
    """
    return rebuild(RevModel, out_dir, dtype=dtype, passes=passes, check_files=check_files,
                   experts_implementation=experts_implementation)


def _config_class() -> Any:
    from transformers import PretrainedConfig

    class RevFFNConfig(PretrainedConfig):
        """The ``auto_map`` AutoConfig of an export whose function is not the original
        architecture's (model_type "revffn"): only an entry point; ``rf.load`` rebuilds
        the original config from the fields and the revffn section."""

        model_type = "revffn"

    return RevFFNConfig


RevFFNConfig = _config_class()


class RevFFNForCausalLM:
    """The ``auto_map`` target: ``AutoModelForCausalLM.from_pretrained(dir,
    trust_remote_code=True)`` lands here and returns :func:`load`'s RevModel."""

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = "AutoModelForCausalLM") -> None:
        """Nothing to register: the class is only an entry point."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str],
                        *args: Any, **kwargs: Any) -> RevModel:
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return load(pretrained_model_name_or_path, dtype=None if dtype == "auto" else dtype,
                    experts_implementation=kwargs.get("experts_implementation"))
