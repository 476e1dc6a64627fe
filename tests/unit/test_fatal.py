"""Which errors fail the whole server (app/engine/fatal.py): CUDA's sticky errors and a lost device, as torch
words them; never an out-of-memory error, nor torch's hint about device-side assertions that ends every
CUDA error."""

from __future__ import annotations

import pytest
import torch

from app.engine.fatal import device_failure

HINT = (
    "\nCUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might "
    "be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\nCompile with `TORCH_USE_CUDA_DSA` to "
    "enable device-side assertions.\n"
)


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: device-side assert triggered",
        "CUDA error: unspecified launch failure",
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: an illegal instruction was encountered",
        "CUDA error: misaligned address",
        "CUDA error: uncorrectable ECC error encountered",
        "CUDA error: uncorrectable NVLink error detected during the execution",
        "CUDA error: no CUDA-capable device is detected",
        "CUDA error: CUDA-capable device(s) is/are busy or unavailable",
        "CUDA error: the launch timed out and was terminated",
        "CUDA error: unknown error",
        "CUDA error: GPU is lost",
        "RuntimeError: the device was lost",
        "GPU has fallen off the bus",
    ],
)
@pytest.mark.parametrize("kind", [RuntimeError, torch.AcceleratorError])
def test_sticky_cuda_errors_and_a_lost_device_fail_the_server(message: str, kind: type[Exception]) -> None:
    assert device_failure(kind(message + HINT)) == message


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB" + HINT),
        torch.AcceleratorError("CUDA error: invalid argument" + HINT),  # the hint alone is not a failure
        RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasGemmEx`" + HINT),
        RuntimeError("Expected all tensors to be on the same device, but found at least two devices"),
        ValueError("grammar refused the token"),
        RuntimeError(""),
    ],
    ids=lambda e: type(e).__name__,
)
def test_out_of_memory_and_other_errors_fail_only_their_rows(error: BaseException) -> None:
    assert device_failure(error) is None


def test_a_failure_is_found_in_the_errors_it_was_raised_from() -> None:
    try:
        try:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered" + HINT)
        except RuntimeError as exc:
            raise ValueError("the library's own words") from exc
    except ValueError as wrapped:
        assert device_failure(wrapped) == "CUDA error: an illegal memory access was encountered"
    oom = torch.OutOfMemoryError("CUDA out of memory")
    oom.__cause__ = RuntimeError("CUDA error: unspecified launch failure")
    assert device_failure(oom) is None  # out of memory first: the row cap's business
