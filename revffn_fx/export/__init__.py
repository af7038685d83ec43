"""Export: write a transformed model as a Hugging Face directory, and load it back.

The file format itself (layout, shards, save, rebuild) is :mod:`revffn_fx.serialization`,
below :mod:`revffn_fx.model`; this package holds the entry points built on a RevModel:
:func:`load` and the ``auto_map`` classes (:mod:`.loading`), :func:`transform_dir`
(:mod:`.transform`) and ``export-original`` (:mod:`.original`).

OUT_DIR layout::

    config.json                      the original config + "revffn" section + "auto_map"
    model.safetensors                the original architecture's weights, HF on-disk names
      (or model-0000k-of-0000n.safetensors + model.safetensors.index.json above max_shard_size)
    revffn_adapters.safetensors      the new revffn adapter weights (absent for revnet)
    modeling_revffn.py               a shim: AutoModelForCausalLM(..., trust_remote_code=True)
    README.md                        model card
    tokenizer*.json, ...             copied from MODEL_DIR when it had them

Weight names. The original weights keep the names Hugging Face itself writes on disk
(``save_pretrained`` turns in-memory fused experts into legacy per-expert tensors for
mixtral and deepseek). Loading goes through ``from_pretrained`` on the original
architecture, so Hugging Face's own key conversions run in both directions and the round
trip is bit-exact; OUT_DIR minus the adapter file is an ordinary checkpoint of the base
architecture. The adapters, which Hugging Face does not know, live in their own file under
their RevModel names (``adapters.<layer>.F_up.weight``), outside the index, so
``from_pretrained`` never sees them as unexpected keys.

Loading (:func:`load`) rebuilds the RevModel by replaying ``transform`` with the options
recorded in the ``revffn`` section on the base model loaded from OUT_DIR, then loads the
adapter file. Only safetensors are read: no pickled code runs.

:func:`transform_dir` never materialises the model: it builds the architecture from
config.json on the meta device, checks the checkpoint's tensor names and shapes against it
with Hugging Face's own conversion rules (on meta tensors), traces and transforms on meta,
then copies the checkpoint's bytes shard by shard into OUT_DIR. Peak memory is one read
buffer, not the model.
"""

from __future__ import annotations

from ..serialization.checkpoint_files import Progress  # noqa: F401
from ..serialization.layout import (  # noqa: F401
    ADAPTER_FILE,
    EXTRA_FILES,
    FORMAT_VERSION,
    INDEX_NAME,
    SHIM_CLASS,
    SHIM_FILE,
    TOKENIZER_FILES,
    WEIGHTS_NAME,
    parse_size,
)
from ..serialization.saving import save
from .loading import RevFFNConfig, RevFFNForCausalLM, load
from .transform import TransformSummary, transform_dir

__all__ = ["ADAPTER_FILE", "RevFFNConfig", "RevFFNForCausalLM", "TransformSummary", "load",
           "parse_size", "save", "transform_dir"]
