"""Checks of what a RevModel is called with, made before anything runs.

:func:`check_attention_mask` gives an ``attention_mask`` of another shape than the ids the
meaning Hugging Face gives it (a shorter 2-D mask is padded with zeros: the positions it
does not cover are masked; a longer one is cut to the ids), and refuses, with one line,
a 1-D or 3-D mask or a 2-D one of another batch size, where the traced graph would
otherwise broadcast or ignore it (a 4-D mask passes unchanged).
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import RevFFNError


def check_attention_mask(model: Any, input_ids: Any, attention_mask: Any) -> Any:
    """``attention_mask`` as the traced graph of a Hugging Face model needs it: ``(batch,
    seq)`` like ``input_ids``. Hand-written models (their own conventions) are left alone."""
    from transformers import PreTrainedModel

    if (attention_mask is None or not isinstance(model, PreTrainedModel)
            or not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2):
        return attention_mask
    if not isinstance(attention_mask, torch.Tensor):
        raise RevFFNError(f"attention_mask must be a tensor, not {type(attention_mask).__name__}")
    batch, seq = input_ids.shape
    if attention_mask.dim() == 4:  # a custom 4-D mask goes to the model as it is
        return attention_mask
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch:
        raise RevFFNError(f"attention_mask has shape {list(attention_mask.shape)}; it must be "
                          f"(batch, sequence) = [{batch}, {seq}] like input_ids (2-D, one row "
                          "per sequence)")
    if attention_mask.shape[1] < seq:  # Hugging Face pads it: the rest is masked
        return torch.nn.functional.pad(attention_mask, (0, seq - attention_mask.shape[1]))
    return attention_mask[:, :seq]
