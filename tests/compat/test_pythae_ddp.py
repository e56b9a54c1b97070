"""Under two processes, VQVAE's EMA quantizer keeps one codebook on every rank through
``from_pythae`` (its forward gets ``uses_ddp=True``, as from pythae's trainer under DDP), where
a plain forward lets each rank's codebook drift with its own shard."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("pythae")

from tests.compat import pythae_ddp_worker as worker

CODEBOOK = ("quantizer.embeddings", "quantizer.cluster_size", "quantizer.ema_embed")


@pytest.mark.slow
def test_vqvae_ema_codebooks_stay_equal_across_two_gloo_ranks(tmp_path: Path) -> None:
    ranks = worker.spawn(tmp_path)
    assert [rank["uses_ddp"] for rank in ranks] == [True, True]
    ours = [rank["from_pythae"] for rank in ranks]
    assert set(CODEBOOK) <= set(ours[0])
    for key in ours[0]:
        torch.testing.assert_close(ours[1][key], ours[0][key], rtol=1e-6, atol=1e-7, msg=key)
    plain = [rank["plain"] for rank in ranks]
    assert not torch.allclose(plain[0]["quantizer.embeddings"], plain[1]["quantizer.embeddings"])
