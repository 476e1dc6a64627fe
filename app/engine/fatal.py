"""Which errors leave the accelerator unusable for the rest of the process (pure).

After a device-side assert, an illegal memory access, an uncorrectable ECC error or a lost device, CUDA's
context is corrupt: every later call fails ("sticky" errors, CUDA's runtime documentation), so no request can
be served again and the process must be restarted. Such an error fails the whole server
(app/engine/worker.py), not a batch. An out-of-memory error is not one: the worker recomputes with fewer rows
(app/engine/oom.py). Neither is any other error: it fails only the rows it touched.

Read from the message, since torch raises most of them as `torch.AcceleratorError` or a plain RuntimeError
whose text is CUDA's (`cudaGetErrorString`), and from the errors it was raised from. Every torch CUDA error
ends with a hint about "device-side assertions": the phrases below are the errors' own, never that hint.
"""

from __future__ import annotations

import re

import torch

FATAL = re.compile(
    "|".join(
        (
            r"device-side assert triggered",
            r"unspecified launch failure",
            r"an illegal memory access",
            r"an illegal instruction",
            r"misaligned address",
            r"hardware stack error",
            r"invalid program counter",
            r"the launch timed out",
            r"\becc error",
            r"uncorrectable nvlink",
            r"no cuda-capable device",
            r"cuda-capable device\(s\) is/are busy or unavailable",
            r"\b(device|gpu)\b[^\n]*\blost\b",
            r"fallen off the bus",
            r"cuda error: unknown error",
        )
    ),
    re.IGNORECASE,
)
"""CUDA's texts for the errors after which its context cannot be used (cudaErrorAssert, LaunchFailure,
IllegalAddress, IllegalInstruction, MisalignedAddress, HardwareStackError, InvalidPc, LaunchTimeout,
ECCUncorrectable, NvlinkUncorrectable, NoDevice, DevicesUnavailable, Unknown: what a lost device answers) and
the driver's words for a lost GPU."""

DEVICE_FAILED = "The server's accelerator failed and the server is restarting; retry on another replica."
"""The message of the 503 `device_failed` every request gets once the device has failed."""

CHAIN = 4
"""How many causes deep an error is read (a library may re-raise CUDA's error as its own)."""


def device_failure(exc: BaseException) -> str | None:
    """Why `exc` means the device is unusable (the first line of CUDA's error), or None: an error the process
    recovers from (out of memory included), which fails only the rows it touched."""
    seen: BaseException | None = exc
    for _ in range(CHAIN):
        if seen is None or isinstance(seen, torch.OutOfMemoryError):
            return None
        text = str(seen)
        if FATAL.search(text):
            return text.strip().splitlines()[0] if text.strip() else type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return None
