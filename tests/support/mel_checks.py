"""How close our log-mel features must be to the reference extractor's."""

from __future__ import annotations

import torch

MEL_ATOL = 1e-5
"""How far the fast log-mel may be from the extractor's: it sums in another order on some CPUs
(app/model/compute/features.py says why this is safe). Seen: 1.2e-7, one ulp."""


def assert_mel_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours, ref, rtol=0, atol=MEL_ATOL)
