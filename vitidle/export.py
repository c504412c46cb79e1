"""ONNX export with a parity gate: a file is only written once onnxruntime reproduces PyTorch.

As optimum's exporters do, the exported graph is run by onnxruntime on CPU and compared with the
PyTorch model: output names, shapes and values (to `atol`) at two batch sizes, and top-1 agreement
on real photos. The export happens in a temporary folder beside the target; only a file that
passed is renamed into place, so a failed export leaves nothing that looks valid.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .engine.discover import evaluating, input_size
from .errors import OnnxError, ParityError, UsageError, first_line
from .io import parents_removed_on_error

INPUT_NAME = "pixel_values"
PARITY_BATCH_SIZES = (1, 4)  # the export itself traces batch 2: parity also covers other sizes
LARGE_WEIGHTS = 1.8 * 2**30  # protobuf caps a file at 2 GiB: larger weights go to `<file>.data`
MIN_OPSET = 17  # LayerNormalization


@dataclass
class ParityReport:
    """What the parity gate compared and found; `max_diff` is the largest |onnx - torch| over all checks."""

    file: str
    exporter: str | None
    opset: int
    outputs: list[str]
    batch_sizes: list[int]
    max_diff: float
    atol: float
    images: int
    top1_agreement: float | None  # share of the photos with the same top-1 class; None for feature outputs

    def to_dict(self) -> dict:
        return asdict(self)


def output_name(model: nn.Module) -> str:
    return "logits" if getattr(model, "num_classes", 1) else "features"


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    opset: int = 18,
    legacy: bool = False,
    atol: float = 1e-4,
    images: torch.Tensor | str | os.PathLike | None = None,
    force: bool = False,
    external_data: bool | None = None,
) -> ParityReport:
    """Export `model` (converted or dense) to ONNX at `path`, then prove onnxruntime matches it.

    torch's dynamo exporter by default, its TorchScript exporter with `legacy=True`; dynamic batch
    axis; weights in `<path>.data` when they would pass protobuf's 2 GiB (or with
    `external_data=True`). The model is exported as a float32 CPU copy. `images` are the photos of
    the check: a (B, C, H, W) batch or a folder (default: `data.sample_images`). Raises
    `ParityError` (nothing written) when the outputs differ.

    >>> import vitidle, tempfile, os
    >>> m = vitidle.convert("deit_tiny", pretrained=False, model_kwargs={"depth": 2, "img_size": 32})
    >>> r = export_onnx(m, os.path.join(tempfile.mkdtemp(), "model.onnx"), legacy=True)
    >>> r.max_diff <= r.atol, r.top1_agreement
    (True, 1.0)
    """
    dest = Path(path)
    if dest.suffix != ".onnx":
        raise UsageError(f"{dest} does not end in .onnx; name the file to export to, e.g. model.onnx")
    if opset < MIN_OPSET:
        raise UsageError(f"opset {opset} is too old: vitidle exports opset {MIN_OPSET} or newer")
    if dest.is_dir():
        raise UsageError(f"{dest} is a folder; give the ONNX file to write, e.g. {dest / 'model.onnx'}")
    data = data_path(dest)
    for existing in (dest, data):  # an orphaned `.data` may be someone's file too
        if existing.exists() and not force:
            raise UsageError(f"{existing} already exists; pass --force (force=True) to replace it")
    model = cpu_float32(model)
    if external_data is None:
        external_data = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > LARGE_WEIGHTS
    with parents_removed_on_error(dest):
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        except OSError as e:
            raise UsageError(f"cannot write {dest}: {e.strerror or e}") from e
        return _export_checked(model, dest, tmp, opset, legacy, atol, images, external_data)


def _export_checked(model: nn.Module, dest: Path, tmp: Path, opset: int, legacy: bool, atol: float,
                    images: torch.Tensor | str | os.PathLike | None, external_data: bool) -> ParityReport:
    """Export into the folder `tmp`, run the parity gate, and move the file(s) to `dest` if it passed."""
    import onnx

    data = data_path(dest)
    try:
        out = tmp / dest.name
        with evaluating(model), torch.no_grad(), quiet():
            _export(model, out, opset, legacy, external_data)
        proto = onnx.load(str(out), load_external_data=False)
        written = onnx_opset(proto)
        if written != opset:  # the dynamo exporter builds opset 18 and converts down only where it can
            raise OnnxError(f"the {'TorchScript' if legacy else 'dynamo'} exporter wrote opset {written}, not "
                            f"{opset}; pass --opset {written}" + ("" if legacy else " or --legacy"))
        if legacy and (external_data or any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)):
            # the TorchScript exporter writes no external data, or (past 2 GiB) a file per weight: one file
            onnx.save_model(onnx.load(str(out)), str(out), save_as_external_data=True, location=data.name)
        report = check_onnx(model, out, atol=atol, images=images)
        report.file, report.exporter = str(dest), "torchscript" if legacy else "dynamo"
        # the data file first: the .onnx appears last, and only after the gate passed
        if (tmp / data.name).exists():
            os.replace(tmp / data.name, data)
        elif data.exists():
            data.unlink()  # an earlier export's external weights
        os.replace(out, dest)
        return report
    except OSError as e:
        raise OnnxError(f"cannot write {dest}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def data_path(path: str | os.PathLike) -> Path:
    """Where the external weights of the ONNX file `path` live: `<path>.data` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def onnx_opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def cpu_float32(model: nn.Module) -> nn.Module:
    """`model` itself if it is a float32 CPU model, else such a copy: onnxruntime here runs float32 on
    CPU, and a CUDA reference (TF32 convolutions) would differ from it by more than atol."""
    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters()):
        return model
    return copy.deepcopy(model).float().cpu()


@contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' warnings and log lines: they say nothing the parity gate does not check."""
    level = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(max(level, logging.WARNING))
        try:
            yield
        finally:
            logging.disable(level)


def _export(model: nn.Module, out: Path, opset: int, legacy: bool, external_data: bool) -> None:
    # batch 2, not 1: the selector has a batch-1 shortcut, and torch.export's dynamic dims start at 2
    x = torch.randn(2, *input_size(model))
    names = dict(input_names=[INPUT_NAME], output_names=[output_name(model)], opset_version=opset)
    try:
        if legacy:
            axes = {name: {0: "batch"} for name in names["input_names"] + names["output_names"]}
            torch.onnx.export(model, (x,), str(out), dynamo=False, dynamic_axes=axes, **names)
        else:
            batch = torch.export.Dim("batch")
            torch.onnx.export(model, (x,), str(out), dynamo=True, dynamic_shapes=({0: batch},),
                              external_data=external_data, verbose=False, **names)
    except Exception as e:  # the exporters raise many types; the message is what matters
        hint = "" if legacy else "; try --legacy (the TorchScript exporter)"
        raise OnnxError(f"the {'TorchScript' if legacy else 'dynamo'} exporter failed: {type(e).__name__}: "
                        f"{first_line(e)}{hint}") from e


def check_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    atol: float = 1e-4,
    images: torch.Tensor | str | os.PathLike | None = None,
) -> ParityReport:
    """Compare an ONNX file with `model` under onnxruntime (CPU); raise `ParityError` on any mismatch.

    Checks the file (`onnx.checker`, full), the input and output names, then output shapes and
    values at batch sizes 1 and 4 (random images) and on the photos (see `export_onnx`), and that
    the top-1 class of every photo is the same (for (B, classes) logits).
    """
    import numpy as np
    import onnx

    from .data import sample_images

    path = Path(path)
    if not path.is_file():
        raise OnnxError(f"ONNX file not found: {path}")
    try:
        onnx.checker.check_model(str(path), full_check=True)
        session = ort_session(path)
    except Exception as e:
        raise OnnxError(f"{path} is not a valid ONNX model: {type(e).__name__}: {first_line(e)}") from e
    expected = [output_name(model)]
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [INPUT_NAME] or outputs != expected:
        raise ParityError(f"{path} has inputs {inputs} and outputs {outputs}; expected [{INPUT_NAME!r}] and {expected}")

    model = cpu_float32(model)
    if not isinstance(images, torch.Tensor):
        images = sample_images(_input_config(model), images)
    if images.dim() != 4 or tuple(images.shape[1:]) != input_size(model):
        raise UsageError(f"the photos are {list(images.shape)}; the model takes (B, {', '.join(map(str, input_size(model)))})")
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, *input_size(model), generator=generator) for b in PARITY_BATCH_SIZES]
    max_diff = 0.0
    with evaluating(model), torch.no_grad():
        for x in [*batches, images]:
            where = f"at batch {len(x)}" if x is not images else f"on {len(x)} photos"
            expect = model(x).numpy()
            try:
                got = session.run(None, {INPUT_NAME: x.numpy()})[0]
            except Exception as e:
                raise OnnxError(f"onnxruntime cannot run {path} on a batch of {len(x)}: {first_line(e)}") from e
            if got.shape != expect.shape:
                raise ParityError(f"ONNX parity failed {where}: output shape {list(got.shape)}, PyTorch's "
                                  f"{list(expect.shape)}")
            diff = float(np.abs(got.astype(np.float64) - expect).max())
            max_diff = max(max_diff, diff)
            if not diff <= atol:  # also catches NaN
                raise ParityError(f"ONNX parity failed {where}: max difference {diff:.3g} > atol {atol:g}",
                                  max_diff=diff, atol=atol)
    agreement = None
    if expected == ["logits"] and expect.ndim == 2:
        same = got.argmax(-1) == expect.argmax(-1)
        agreement = float(same.mean())
        if not same.all():  # values within atol: only a top two closer than 2 atol can swap
            raise ParityError(f"ONNX parity failed: the top-1 class differs on {int((~same).sum())} of {len(same)} "
                              f"photos (max difference {max_diff:.3g}, atol {atol:g})", max_diff=max_diff, atol=atol)
    return ParityReport(file=str(path), exporter=None, opset=onnx_opset(onnx.load(str(path), load_external_data=False)),
                        outputs=outputs, batch_sizes=list(PARITY_BATCH_SIZES), max_diff=max_diff, atol=atol,
                        images=len(images), top1_agreement=agreement)


def ort_session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session, with onnxruntime's defaults but `threads` intra-op threads.

    (Measured for `bench`, bs1: pools that do not spin when idle cost the idle model 3% of its
    speedup, since its graph has more small nodes; one global pool cannot be set once any session exists.)
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no warnings on stderr
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _input_config(model: nn.Module) -> dict:
    config = getattr(model, "vitidle_config", None)
    if config is not None:
        return config["input"]
    from .convert import data_config

    return data_config(model)
