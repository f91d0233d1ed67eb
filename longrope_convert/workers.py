"""The processes of a torchrun launch: who computes which evaluation, and who writes.

Under torchrun every rank runs the same search; the evaluations of each batch are dealt out one
per rank and the results gathered to all ranks (gloo on CPU, NCCL on GPUs), so every rank sees
the same results in the same order and takes the same decisions. Rank 0 alone writes files, and
its clock alone decides when a time budget is spent.

Each rank holds one replica of the model: on one GPU, or with a device map on a group of GPUs
(the node's GPUs split evenly among its ranks: 8 GPUs and 4 ranks per node give 2 GPUs a replica).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from .errors import LongRoPEError


def gpu_group(local_rank: int, local_world_size: int, device_count: int) -> list[int]:
    """The GPUs of one process: the node's GPUs split evenly among its processes, in order.
    Raises LongRoPEError when the node has fewer GPUs than processes."""
    per_process = device_count // local_world_size
    if per_process == 0:
        raise LongRoPEError(f"{local_world_size} processes per node but {device_count} GPUs: "
                            "launch at most one process per GPU")
    return list(range(local_rank * per_process, (local_rank + 1) * per_process))


class Workers:
    """The processes of a torchrun launch (or just this one): rank 0 writes, all compute."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.gpus: list[int] = []
        if torch.cuda.is_available():
            self.gpus = gpu_group(int(os.environ.get("LOCAL_RANK", "0")),
                                  int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count())
        self.device = torch.device(f"cuda:{self.gpus[0]}" if self.gpus else "cpu")  # the replica's first device
        if self.world > 1 and not torch.distributed.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank (what rank 0 alone computed or decided)."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def map(self, function: Callable[[Any], Any], items: list, on_result: Callable[[Any, Any], None],
            keep_going: Callable[[], bool] = lambda: True) -> None:
        """function(item) for the items, in rounds of one item per rank; on_result(item, result) in order
        as each round ends. Before each round rank 0's keep_going() decides whether to go on."""
        for start in range(0, len(items), self.world):
            if not self.from_main(keep_going()):
                return
            chunk = items[start : start + self.world]
            mine = function(chunk[self.rank]) if self.rank < len(chunk) else None
            if self.world > 1:
                gathered = [None] * self.world
                torch.distributed.all_gather_object(gathered, mine)
            else:
                gathered = [mine]
            for item, result in zip(chunk, gathered):
                on_result(item, result)

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
