"""A model's output, read and rebuilt: where the logits and the loss sit in what a
model's forward returns (a transformers output, a tensor, a tuple, an object or a dict),
and the same structure with new values put back.

The markers :data:`LOGITS` / :data:`LOSS` stand in a template for the values the graphs
compute; :data:`HF_OUTPUT` stands for a whole transformers output.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from ..errors import TraceError


class _Slot:
    """A marker for where logits or loss sit in a model's output structure."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"

    # markers are compared by identity: copies (deepcopy, pickle) are the marker itself
    def __copy__(self) -> _Slot:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _Slot:
        return self

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _slot_named, (self.name,)


LOGITS, LOSS, HF_OUTPUT = _Slot("logits"), _Slot("loss"), _Slot("transformers output")


def _slot_named(name: str) -> _Slot:
    return next(s for s in (LOGITS, LOSS, HF_OUTPUT) if s.name == name)


@contextmanager
def router_logits_off(model: nn.Module) -> Iterator[None]:
    """Router logits are captured by the runtime's tap, never by the model's own forward:
    a config asking for them (TRL's SFTTrainer sets it) would make the model compute a
    load-balancing loss from logits recorded outside the reversible backward."""
    config = getattr(model, "config", None)
    asked = bool(getattr(config, "output_router_logits", False))
    if asked:
        config.output_router_logits = False
    try:
        yield
    finally:
        if asked:
            config.output_router_logits = True


def _depends_on(node: fx.Node, placeholder: str) -> bool:
    seen, todo = {node}, [node]
    while todo:
        n = todo.pop()
        if n.op == "placeholder" and n.target == placeholder:
            return True
        for i in n.all_input_nodes:
            if i not in seen:
                seen.add(i)
                todo.append(i)
    return False


def split_output(out: Any, model_name: str) -> tuple[Any, Any, Any]:
    """A traced model output as ``(template, logits, loss)``.

    transformers outputs give :data:`HF_OUTPUT`; a tensor is the logits; in a tuple or
    list the value computed from the labels is the loss and the other one the logits; an
    object or dict has ``logits`` (and maybe ``loss``) fields. Other traced values in the
    output are refused: revffn-fx runs a model for its logits and loss.
    """
    try:
        from transformers.utils import ModelOutput
    except ImportError:  # pragma: no cover
        ModelOutput = ()  # type: ignore[assignment]
    if isinstance(out, ModelOutput):
        return HF_OUTPUT, out.logits, getattr(out, "loss", None)
    if isinstance(out, fx.Proxy):
        return LOGITS, out, None
    what = f"{model_name}.forward returns"
    if isinstance(out, (tuple, list)):
        items, logits, loss = list(out), None, None
        for k, v in enumerate(items):
            if not isinstance(v, fx.Proxy):
                continue
            is_loss = _depends_on(v.node, "labels")
            if (loss if is_loss else logits) is not None:
                raise TraceError(
                    f"{what} a {type(out).__name__} of {len(items)} with more than one "
                    f"{'loss' if is_loss else 'value not computed from the labels'}; "
                    "revffn-fx needs the outputs to be logits and (with labels) the loss")
            if is_loss:
                loss, items[k] = v, LOSS
            else:
                logits, items[k] = v, LOGITS
        if logits is None:
            raise TraceError(f"{what} no logits (no traced tensor in its {type(out).__name__})")
        template = type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
        return template, logits, loss
    fields = (dict(out) if isinstance(out, dict) else
              {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
              if dataclasses.is_dataclass(out) else
              dict(vars(out)) if hasattr(out, "__dict__") else None)
    if fields is None or not isinstance(fields.get("logits"), fx.Proxy):
        raise TraceError(f"{what} a {type(out).__name__}: expected logits as a tensor, a "
                         "tuple (logits, loss), or an object or dict with a logits field")
    extra = [k for k, v in fields.items()
             if isinstance(v, fx.Proxy) and k not in ("logits", "loss")]
    if extra:
        raise TraceError(f"{what} traced value(s) {extra} besides logits and loss; "
                         "revffn-fx needs the outputs to be logits and the loss")
    logits, loss = fields["logits"], fields.get("loss")
    marks = {"logits": LOGITS, **({"loss": LOSS} if "loss" in fields else {})}
    if isinstance(out, dict):
        template = type(out)({**fields, **marks})
    elif dataclasses.is_dataclass(out):
        template = dataclasses.replace(out, **marks)
    else:
        template = copy.copy(out)
        template.__dict__.update(marks)
    return template, logits, loss


def rebuild_output(template: Any, logits: Any, loss: Any) -> Any:
    """The model's own output structure with the graph's logits and loss put back."""
    if template is HF_OUTPUT:
        return MoeCausalLMOutputWithPast(logits=logits, loss=loss)
    if template is LOGITS:
        return logits

    def put(v: Any) -> Any:
        return logits if v is LOGITS else loss if v is LOSS else v

    if isinstance(template, (tuple, list)):
        items = [put(v) for v in template]
        return type(template)(*items) if hasattr(template, "_fields") else type(template)(items)
    if isinstance(template, dict):
        return type(template)({k: put(v) for k, v in template.items()})
    if dataclasses.is_dataclass(template):
        return dataclasses.replace(template, **{f.name: put(getattr(template, f.name))
                                                for f in dataclasses.fields(template)
                                                if getattr(template, f.name) in (LOGITS, LOSS)})
    out = copy.copy(template)
    out.__dict__.update({k: put(v) for k, v in vars(template).items()})
    return out


def logits_and_loss(out: Any) -> tuple[Any, Any]:
    """``(logits, loss)`` of whatever a (traced or reversible) model returned."""
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, dict) or hasattr(out, "logits"):
        get = out.get if isinstance(out, dict) else (lambda k, d=None: getattr(out, k, d))
        return get("logits"), get("loss", None)
    if isinstance(out, (tuple, list)):
        tensors = [v for v in out if isinstance(v, torch.Tensor)]
        loss = next((v for v in tensors if v.dim() == 0), None)
        logits = next((v for v in tensors if v is not loss), None)
        return logits, loss
    raise TypeError(f"cannot find logits in a {type(out).__name__}")


def template_of(out: Any) -> Any:
    """The output structure of a real (not traced) model output, with :data:`LOGITS` and
    :data:`LOSS` markers where :func:`logits_and_loss` found them."""
    try:
        from transformers.utils import ModelOutput
    except ImportError:  # pragma: no cover
        ModelOutput = ()  # type: ignore[assignment]
    if isinstance(out, ModelOutput):
        return HF_OUTPUT
    if isinstance(out, torch.Tensor):
        return LOGITS
    logits, loss = logits_and_loss(out)

    def mark(v: Any) -> Any:
        return LOGITS if v is logits and v is not None else LOSS if (
            v is loss and v is not None) else v

    if isinstance(out, (tuple, list)):
        items = [mark(v) for v in out]
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)
    if isinstance(out, dict):
        return type(out)({k: mark(v) for k, v in out.items()} | (
            {"loss": LOSS} if "loss" in out else {}))
    marks = {"logits": LOGITS, **({"loss": LOSS} if hasattr(out, "loss") else {})}
    if dataclasses.is_dataclass(out):
        return dataclasses.replace(out, **marks)
    template = copy.copy(out)
    template.__dict__.update(marks)
    return template
