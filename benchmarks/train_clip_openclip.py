"""open_clip's trainer for the train_clip benchmark: one torchrun rank of ``open_clip_train.main``.

Run from the repository root:
``torchrun --nproc_per_node 2 -m benchmarks.train_clip_openclip MODEL_CONFIG_DIR ARGS_JSON``.
Registers mmpipe's model configs, uses one thread per rank, carries two compatibility shims and
prints the exact time of every "Train Epoch" log line (open_clip's own lines carry whole seconds).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys

import open_clip
import open_clip_train.data
import torch
from torch.nn.parallel import DistributedDataParallel
from webdataset.tariterators import tar_file_expander

from benchmarks.train_clip_engines import STEP_MARK

# Shim 1: webdataset 0.2.111 ends each shard with an EOF marker ({}) that open_clip_train
# 3.3.0's group_by_keys_nothrow does not expect (KeyError: 'fname' at the end of the first shard).
# Module level, so DataLoader workers have it however they start.
open_clip_train.data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)


class CpuDDP(DistributedDataParallel):
    """Shim 2: open_clip passes device_ids=[device]; torch refuses device_ids for a CPU module."""

    def __init__(self, module, device_ids=None, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids=device_ids, **kwargs)


class StepStamp(logging.Handler):
    """Prints each "Train Epoch" record with its creation time, for the benchmark to read."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Train Epoch"):
            print(f"{STEP_MARK} {record.created:.6f} {message}", flush=True)


def main(argv: list[str]) -> int:
    model_configs, args_file = argv
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    torch.nn.parallel.DistributedDataParallel = CpuDDP
    open_clip.add_model_config(model_configs)
    logging.getLogger().addHandler(StepStamp())
    from open_clip_train.main import main as train

    # The arguments come in a file: torchrun's own parser would claim some (--logs).
    with open(args_file) as f:
        return train(json.load(f)) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
