"""Typed errors. Each carries a one-line message that says how to fix the call."""


class VitidleError(Exception):
    """A runtime failure: the CLI prints the message on one line and exits 1."""

    exit_code = 1


class UsageError(VitidleError):
    """Bad input from the caller (unknown model, keep ratio out of range, bad plan): exit 2."""

    exit_code = 2


class UnknownModelError(UsageError):
    """The model name is neither a vitidle alias nor a timm model."""


class UnsupportedModelError(UsageError):
    """The model has no ViT-style chain of attention blocks that vitidle can idle."""


class CheckpointError(VitidleError):
    """A weights file or a converted-model folder is missing, corrupt or does not fit the model."""


class WeightsUnavailableError(VitidleError):
    """Pretrained weights cannot be fetched (offline) and are not in the local cache."""


class ConversionError(VitidleError):
    """A graph pass failed; the message names the pass."""


class OnnxError(VitidleError):
    """The ONNX exporter failed, or an ONNX file is not a valid model that onnxruntime can run."""


class ParityError(OnnxError):
    """onnxruntime's outputs differ from PyTorch's: carries the largest difference and the tolerance."""

    def __init__(self, message: str, max_diff: float | None = None, atol: float | None = None):
        super().__init__(message)
        self.max_diff = max_diff
        self.atol = atol


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (fx and exporters append dumps), or its type's name."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
