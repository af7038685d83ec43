"""``revffn export-original REV_DIR HF_DIR``: a standard checkpoint of the original
architecture from a revffn-fx directory whose coupling trains the original function
(``none``, ``bdia``): Hugging Face's own ``save_pretrained``, no ``revffn`` section, no
``auto_map``, loadable without revffn-fx. Written like every export (staged beside HF_DIR,
swapped in at the end; an existing HF_DIR is replaced only with ``force``)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..frontend.loading import quiet
from ..outdir import writing
from ..serialization.layout import EXTRA_FILES, TOKENIZER_FILES
from .loading import load


def export_original(rev_dir: str | os.PathLike[str], hf_dir: str | os.PathLike[str], *,
                    force: bool = False, force_foreign: bool = False,
                    check_files: bool = True) -> Path:
    """Load ``rev_dir`` (:func:`~revffn_fx.export.load`), take :meth:`RevModel.to_original`
    and write it to ``hf_dir`` with its tokenizer files; returns ``hf_dir``. A coupling
    whose function differs is refused (a RevFFNError naming the ones that work)."""
    src, out = Path(rev_dir).expanduser(), Path(hf_dir).expanduser()
    model = load(src, check_files=check_files).to_original()
    with writing(out, force=force, model_dir=src, force_foreign=force_foreign) as tmp:
        with quiet():
            model.save_pretrained(tmp)
        for name in (*TOKENIZER_FILES, *EXTRA_FILES):
            if (src / name).is_file() and not (tmp / name).exists():
                shutil.copyfile(src / name, tmp / name)
    return out
