"""transform_dir: transform a checkpoint directory into a revffn-fx directory without
materialising the model, and its summary."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import couplings
from ..calibration import calibrate as calibrate_adapters
from ..calibration import calibration_batches
from ..checks.verification import verify as verify_model
from ..errors import ConversionError, ExportError, LoadError
from ..frontend.loading import (
    check_config,
    check_config_bounds,
    check_fits,
    load_model,
    quiet,
    refuse_export,
)
from ..frontend.registry import facts_for
from ..model import RevModel
from ..model_setup import parse_layers
from ..options import TransformOptions
from ..outdir import check_out_dir, writing
from ..output import human_bytes
from ..passes.couple import make_adapters
from ..serialization.checkpoint_files import (
    SAFETENSORS_DTYPES,
    Progress,
    TensorEntry,
    checkpoint_tensors,
    copy_extra_files,
    extra_files,
    memory_tensors,
    seal,
    write_safetensors,
    write_shards,
)
from ..serialization.layout import (
    ADAPTER_FILE,
    count_params,
    layer_span,
    parse_size,
    revffn_section,
    write_meta,
)
from ..tools.memory_plan import activation_peak
from .loading import load

# ------------------------------------------------------------------------------ transform_dir

def _activation_estimate(config: Any, rev: RevModel, batch: int = 8,
                         seq: int = 2048) -> tuple[int, int, int, int] | None:
    """Activations + loss head at a step's peak, plain fine-tuning and ``rev`` (its coupling,
    loss head and converted layers), as ``revffn plan`` counts them (ordinary optimizer);
    None when the config lacks what the estimator reads."""
    try:
        return (batch, seq,
                activation_peak(config, batch, seq, "none", "original"),
                activation_peak(config, batch, seq,
                                "checkpoint" if rev.coupling == "none" else rev.coupling,
                                getattr(rev, "loss_head", None) or "original",
                                layers=list(rev.converted)))
    except (AttributeError, TypeError, ValueError, KeyError):
        return None


@dataclass
class TransformSummary:
    """What :func:`transform_dir` found and did."""

    model_dir: str
    out_dir: str
    model_type: str
    coupling: str
    num_layers: int
    converted: list[int]
    refused: list[tuple[int, str]]  # (layer, why it cannot be converted)
    not_selected: list[int]  # convertible, but left out by ``layers``
    params_before: int
    params_added: int
    dtype: str
    files: list[str] = field(default_factory=list)  # everything written to OUT_DIR
    shards: list[str] = field(default_factory=list)  # the weight files among them
    checkpoint_bytes: int = 0
    verify: Any = None  # VerifyReport, or None when not asked
    calibration: Any = None  # CalibrationReport, or None when not asked
    dry_run: bool = False
    seconds: float = 0.0
    rev: RevModel | None = field(default=None, repr=False)  # the transformed model, on meta
    # estimated bytes saved for backward, (batch, seq, before, after), from the config
    activation_estimate: tuple[int, int, int, int] | None = None

    def lines(self) -> list[str]:
        """The human-readable report, one line each."""
        out = [f"{self.model_dir}: {self.model_type}, {self.num_layers} decoder layers, "
               f"{self.params_before:,} parameters ({self.dtype})"]
        if self.coupling == "none":  # the exact mode
            out.append(f"exact mode: no layer converted; all {self.num_layers} layers run "
                       "under activation checkpointing, with the lean loss head")
        else:
            out.append(f"converted {len(self.converted)} of {self.num_layers} layers to "
                       f"{self.coupling} couplings: {layer_span(self.converted) or '-'}")
        out += [f"  layer {i} not converted: {why}" for i, why in self.refused]
        if self.not_selected:
            out.append(f"  left out by --layers: {layer_span(self.not_selected)}")
        pct = 100 * self.params_added / max(self.params_before, 1)
        out.append(f"parameters added: {self.params_added:,} ({pct:.2f}%)"
                   + (" (revffn adapters)" if self.params_added else ""))
        if self.activation_estimate is not None:
            b, s, before, after = self.activation_estimate
            out.append(f"activations at the step's peak (as `revffn plan`): "
                       f"{human_bytes(before)} plain -> {human_bytes(after)}")
            out.append(f"  assuming batch {b} x seq {s} (set with --estimate-batch, "
                       "--estimate-seq)")
        if self.calibration is not None:
            out.append(f"adapters: {self.calibration.summary()}")
        wide = getattr(getattr(self.rev, "options", None), "stream_dtype", None)
        if wide == torch.int32:
            out.append("streams: exact, int32 units of 2**-16 inside the reversible stacks")
        elif wide is not None:
            out.append(f"streams: carried in {str(wide).replace('torch.', '')} inside the "
                       "reversible stacks")
        if self.verify is not None:
            out.append(f"verify: {self.verify.summary()}")
        if self.dry_run:
            out.append(f"dry run: nothing written (would write {self.out_dir})")
        else:
            weights = [s for s in self.shards if s.endswith(".safetensors")]
            out.append(f"wrote {self.out_dir}: {len(weights)} weight file(s) "
                       f"({self.checkpoint_bytes / 1e6:,.1f} MB), {len(self.files)} files in "
                       f"all, in {self.seconds:.1f}s")
        return out


_SD_DTYPES = {"F64", "F32", "F16", "BF16"}


def _checkpoint_dtype(config: Any, entries: Sequence[TensorEntry]) -> torch.dtype:
    """The dtype ``from_pretrained`` picks by default ("auto"): config's, else the weights'."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    first = next((t for t in entries if t.dtype in _SD_DTYPES), None)
    return SAFETENSORS_DTYPES[first.dtype] if first else torch.get_default_dtype()


_WIDENS = {("F16", torch.float32), ("BF16", torch.float32), ("F16", torch.float64),
           ("BF16", torch.float64), ("F32", torch.float64)}
log = logging.getLogger("revffn_fx.export")


def _check_dtypes(model: torch.nn.Module, entries: Sequence[TensorEntry], weights: Path,
                  dtype: torch.dtype) -> None:
    """Tensors stored in another dtype than the model loads them in: a widening cast is
    exact (a warning naming the tensor), a rounding one or ints for floats is refused."""
    keep32 = [*(getattr(model, "_keep_in_fp32_modules", None) or ()),
              *(getattr(model, "_keep_in_fp32_modules_strict", None) or ())]
    ints = {k for k, v in model.state_dict().items() if not v.is_floating_point()}
    widened: list[TensorEntry] = []
    for t in entries:
        stored = SAFETENSORS_DTYPES.get(t.dtype)
        if stored is None:
            raise LoadError(f"{weights}: tensor {t.name} is stored as {t.dtype}, a dtype "
                            "revffn-fx does not convert (it reads F64, F32, F16, BF16 and "
                            "integer buffers); convert the checkpoint first")
        if stored == dtype or t.name in ints:
            continue
        if not stored.is_floating_point:
            raise LoadError(f"{weights}: tensor {t.name} is stored as {t.dtype} (integers) but "
                            f"the model needs {str(dtype).replace('torch.', '')}")
        if stored == torch.float32 and any(m in t.name for m in keep32):
            continue  # the architecture keeps this module in float32 on purpose
        if (t.dtype, dtype) in _WIDENS:
            widened.append(t)
            continue
        raise LoadError(f"{weights}: tensor {t.name} is stored as {t.dtype} but the model loads "
                        f"{str(dtype).replace('torch.', '')} (config.json), which would round it;"
                        " set config.json's dtype to match the weights")
    if widened:
        log.warning("warning: %s: %d tensor(s) stored in another dtype are widened exactly to "
                    "%s, e.g. %s (%s)", weights, len(widened), str(dtype).replace("torch.", ""),
                    widened[0].name, widened[0].dtype)


def _meta_model(model_dir: Path, config_path: Path, model_type: str,
                dtype_of: Callable[[Any], torch.dtype]) -> tuple[torch.nn.Module, torch.dtype]:
    """The architecture built from config.json on the meta device, in the load dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with quiet():
            config = AutoConfig.from_pretrained(model_dir, local_files_only=True,
                                                trust_remote_code=False)
    except (ValueError, TypeError, KeyError, OSError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"{config_path}: invalid config: {detail}") from e
    dtype = dtype_of(config)
    try:
        with quiet(), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                     **facts_for(model_type).load_kwargs)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoadError(f"{config_path}: cannot build a causal LM for model_type "
                        f"{model_type!r}: {detail}") from e
    return model, dtype


def transform_dir(model_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                  coupling: str = "revffn", layers: str | Sequence[int] | None = None,
                  verify: bool = False, force: bool = False, dry_run: bool = False,
                  max_shard_size: int | str = "2GB",
                  progress: Progress | None = None, attention: str = "plain",
                  fixed_point_iters: int | None = None,
                  fixed_point_tol: float | None = None,
                  calibrate: str | os.PathLike[str] | None = None,
                  calibration_tokens: int = 16384,
                  stream_dtype: str | torch.dtype | None = None,
                  momentum: float | None = None, exact_streams: bool | None = None,
                  estimate_batch: int = 8, estimate_seq: int = 2048,
                  options: TransformOptions | None = None, force_foreign: bool = False,
                  allow_nonfinite: bool = False) -> TransformSummary:
    """Transform the checkpoint in ``model_dir`` into a revffn-fx directory ``out_dir``.

    The model is never materialised (meta device; tensors are copied shard by shard), so
    memory stays far below the checkpoint's size. ``progress(done, total, file)`` is called
    before and after each weight shard. ``verify`` loads the written directory and checks
    the generated backward against autograd on a small random batch (needs the memory of
    the model). ``calibrate``: a text file (or JSONL with ``text`` or ``prompt`` and
    ``completion`` fields) whose first ``calibration_tokens`` tokens fit the revffn adapters
    by least squares (:func:`revffn_fx.calibration.calibrate`; loads the model for real).
    ``momentum``, ``exact_streams``: options of the momentum and meft couplings
    (:func:`revffn_fx.transform`).
    ``stream_dtype`` (recorded, see :func:`revffn_fx.transform`): unset or "auto" is the
    run-time rule (one step wider than the hidden state); float64 when calibrating fp32.
    ``estimate_batch`` x ``estimate_seq``: the batch the summary's activation estimate
    assumes (nothing else uses them). ``options``: the transform's options as one
    :class:`~revffn_fx.options.TransformOptions` (what the CLI passes); when given it
    replaces the option keywords (coupling, layers, attention, fixed_point_*,
    stream_dtype, momentum, exact_streams).
    ``force`` replaces an ``out_dir`` that revffn-fx wrote (its marker, nothing else in
    it); ``force_foreign`` replaces any directory. ``allow_nonfinite``: write weights
    holding NaN or Inf (refused by default, naming the tensor; checked while copying).
    Every problem raises a one-line :class:`~revffn_fx.errors.RevFFNError`
    (LoadError, ConversionError, ExportError) and leaves no ``out_dir`` behind.
    """
    start = time.perf_counter()
    if options is None:  # checked now: bad options stop us before any file is read
        options = TransformOptions(coupling=coupling, layers=layers, attention=attention,
                                   fixed_point_iters=fixed_point_iters,
                                   fixed_point_tol=fixed_point_tol, stream_dtype=stream_dtype,
                                   momentum=momentum, exact_streams=exact_streams)
    src, out = Path(model_dir).expanduser(), Path(out_dir).expanduser()
    limit = parse_size(max_shard_size)
    config_path, model_type, weights, entries = _read_source(src, out, force, force_foreign)
    rev = _plan_on_meta(src, config_path, model_type, weights, entries,
                        options, calibrate is not None)
    adapters, calibration = _adapters(src, rev, calibrate, calibration_tokens, dry_run)
    summary = _summary(src, out, model_type, rev, adapters, calibration, dry_run,
                       _activation_estimate(rev.model.config, rev, estimate_batch, estimate_seq))
    if not dry_run:
        with writing(out, force=force, model_dir=src, force_foreign=force_foreign) as tmp:
            _write_files(tmp, src, config_path, entries, rev, adapters, summary, calibrate,
                         limit, progress, check_finite=not allow_nonfinite)
            if verify:
                summary.verify = _verify_dir(tmp)
    summary.seconds = time.perf_counter() - start
    return summary


def _read_source(src: Path, out: Path, force: bool, force_foreign: bool
                 ) -> tuple[Path, str, Path, list[TensorEntry]]:
    """Check MODEL_DIR (config, tensor headers against the config's sizes, extra files) and
    OUT_DIR before any work: ``(config path, model type, weights file, tensor entries)``."""
    config_path, model_type = check_config(src)
    refuse_export(config_path)  # an export of a function-changing coupling: not a MODEL_DIR
    weights, entries = checkpoint_tensors(src)
    shapes = {t.name: (t.dtype, t.shape) for t in entries}
    # the config's sizes against the headers, before the (meta) model is built
    check_config_bounds(config_path, json.loads(config_path.read_text()), shapes, weights)
    extra_files(src)  # a tokenizer file linking out of MODEL_DIR stops us before any work
    check_out_dir(out, force, src, force_foreign=force_foreign)
    return config_path, model_type, weights, entries


def _plan_on_meta(src: Path, config_path: Path, model_type: str, weights: Path,
                  entries: list[TensorEntry], options: TransformOptions,
                  calibrating: bool) -> RevModel:
    """The architecture on the meta device, checked against the checkpoint, transformed
    with every pass run (a failure must stop us before writing)."""
    model, dtype = _meta_model(src, config_path, model_type,
                               lambda cfg: _checkpoint_dtype(cfg, entries))
    check_fits(model, {t.name: (t.dtype, t.shape) for t in entries}, weights, dtype)
    _check_dtypes(model, entries, weights, dtype)
    # the cross-branch split needs an example forward, which a meta model cannot run: the
    # structure and adapters do not depend on it, so plan with plain attention here and
    # record the option; rf.load (and --verify) build the cross-branch attention for real
    options = options.resolved(str(dtype), calibrating=calibrating)  # "auto"
    rev = RevModel(model, options=options.replace(attention="plain"))
    rev.attention, rev.transform_options = options.attention, options
    rev.specs(True)  # run every pass now (on meta): a failure must stop us before writing
    return rev


def _initial_adapters(rev: RevModel) -> dict[str, torch.Tensor]:
    """The coupling's adapters created for real (on the CPU), exactly as RevModel
    initialises them; none for couplings without."""
    adapters: dict[str, torch.Tensor] = {}
    if couplings.get(rev.coupling).adapter_params:
        pdtype = next(rev.model.parameters()).dtype
        for i in rev.converted:
            for k, v in make_adapters(rev.hidden_size, pdtype, "cpu",
                                      rev.update_targets[i]).state_dict().items():
                adapters[f"adapters.{i}.{k}"] = v
    return adapters


def _summary(src: Path, out: Path, model_type: str, rev: RevModel,
             adapters: dict[str, torch.Tensor], calibration: Any, dry_run: bool,
             estimate: tuple[int, int, int, int] | None) -> TransformSummary:
    """The summary before writing: the layers converted, refused, left out by ``layers``."""
    model = rev.model
    options = rev.transform_options
    n = len(rev.plan.layers)
    wanted = parse_layers(None if options.layers is None else list(options.layers), n)
    refused = [(lp.index, lp.reason or "not convertible") for lp in rev.plan.layers
               if not lp.convertible]
    not_selected = [lp.index for lp in rev.plan.layers
                    if lp.convertible and lp.index not in rev.converted and wanted is not None]
    return TransformSummary(
        str(src), str(out), model_type, rev.coupling, n, list(rev.converted), refused,
        not_selected, count_params(model), sum(v.numel() for v in adapters.values()),
        str(next(model.parameters()).dtype).replace("torch.", ""), calibration=calibration,
        dry_run=dry_run, rev=rev, activation_estimate=estimate)


def _calibration_record(file: str, calibration: Any) -> dict[str, Any]:
    """The ``calibration`` entry of the revffn section: file, tokens, ridge, and each
    layer's output error before and after."""
    return {"file": file, "tokens": calibration.tokens, "ridge": calibration.ridge,
            "layer_output_rel_err": {str(f.index): [round(f.rel_err_before, 4),
                                                    round(f.rel_err_after, 4)]
                                     for f in calibration.layers}}


def _write_files(tmp: Path, src: Path, config_path: Path, entries: list[TensorEntry],
                 rev: RevModel, adapters: dict[str, torch.Tensor], summary: TransformSummary,
                 calibration_file: str | os.PathLike[str] | None, limit: int,
                 progress: Progress | None, check_finite: bool) -> None:
    """Write OUT_DIR's files into its staging directory ``tmp``: the weight shards, the
    adapter file, config.json with the revffn section, shim and model card, the sha256
    record, the tokenizer and other extras; recorded in ``summary``."""
    digests: dict[str, str] = {}
    shards = write_shards(tmp, entries, limit, progress, digests, check_finite=check_finite)
    files = list(shards)
    if adapters:
        digests[ADAPTER_FILE] = write_safetensors(tmp / ADAPTER_FILE, memory_tensors(adapters),
                                                   check_finite=check_finite)
        files.append(ADAPTER_FILE)
    section = revffn_section(rev, {k: list(v.shape) for k, v in adapters.items()},
                             next(rev.model.parameters()).dtype, summary.params_before)
    if summary.calibration is not None:
        section["calibration"] = _calibration_record(Path(calibration_file).name,
                                                     summary.calibration)
    files += write_meta(tmp, json.loads(config_path.read_text()), section)
    seal(tmp, digests)  # the record rf.load and `revffn verify` check: weights, shim, config
    files += copy_extra_files(src, tmp)
    summary.files, summary.shards = files, shards
    summary.checkpoint_bytes = sum(t.nbytes for t in entries)


def _adapters(src: Path, rev: RevModel, calibration_file: str | os.PathLike[str] | None,
              tokens: int, dry_run: bool) -> tuple[dict[str, torch.Tensor], Any]:
    """The adapters to write and the calibration report (None when not calibrating).
    ``--calibrate``: the calibration batches are read (a dry run stops there), then the
    adapters are fitted on the model loaded for real."""
    adapters = _initial_adapters(rev)
    if calibration_file is None:
        return adapters, None
    if not couplings.get(rev.coupling).adapter_params:
        raise ConversionError(f"--calibrate fits the revffn adapters; {rev.coupling} has none")
    batches = calibration_batches(src, calibration_file, tokens)
    if dry_run:
        return adapters, None
    return _calibrated_adapters(src, rev, batches, adapters)


def _calibrated_adapters(src: Path, meta_rev: RevModel, batches: list[torch.Tensor],
                         adapters: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                     Any]:
    """Load the model for real, fit the adapters on ``batches``; same keys and dtypes."""
    model = load_model(src)
    rev = RevModel(model, options=meta_rev.transform_options.replace(
        layers=list(meta_rev.converted)))
    report = calibrate_adapters(rev, batches)
    fitted = {f"adapters.{k}": v.detach().cpu() for k, v in rev.adapters.state_dict().items()}
    if set(fitted) != set(adapters):
        raise ExportError("calibration produced different adapters than the transform")
    return {k: fitted[k].to(adapters[k].dtype).contiguous() for k in adapters}, report


def _verify_dir(path: Path, batch: int = 2, seq: int = 16, seed: int = 0) -> Any:
    """Load ``path`` for real and run :func:`revffn_fx.checks.verification.verify` on
    random tokens."""
    rev = load(path)
    vocab = getattr(rev.config, "vocab_size", None) or 128
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    try:
        report = verify_model(rev, ids, seed=seed)
    except (NotImplementedError, RuntimeError) as e:  # a kernel this torch lacks for the dtype
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, NotImplementedError) and not re.search(
                r"not implemented for|Expected .* to be .*(Float|Double|Half)", detail):
            raise
        dtype = str(next(rev.parameters()).dtype).replace("torch.", "")
        raise ExportError(f"verify: this torch cannot run the model in {dtype} here ({detail});"
                          " nothing written") from e
    if not report.ok:
        raise ExportError(f"verify failed, nothing written: {report.summary()}")
    return report
