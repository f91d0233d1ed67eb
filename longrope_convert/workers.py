"""The processes of a torchrun launch: who computes which evaluation, and who writes.

Under torchrun every rank runs the same search; the evaluations of each batch are dealt out one
per rank and the results gathered to all ranks (gloo on CPU, NCCL on GPUs), so every rank sees
the same results in the same order and takes the same decisions. Rank 0 alone writes files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch


class Workers:
    """The processes of a torchrun launch (or just this one): rank 0 writes, all compute."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if self.world > 1 and not torch.distributed.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def map(self, function: Callable[[Any], Any], items: list, on_result: Callable[[Any, Any], None]) -> list:
        """function(item) for every item, in rounds of one item per rank; on_result(item, result) in order."""
        results = []
        for start in range(0, len(items), self.world):
            chunk = items[start : start + self.world]
            mine = function(chunk[self.rank]) if self.rank < len(chunk) else None
            if self.world > 1:
                gathered = [None] * self.world
                torch.distributed.all_gather_object(gathered, mine)
            else:
                gathered = [mine]
            for item, result in zip(chunk, gathered):
                on_result(item, result)
                results.append(result)
        return results

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
