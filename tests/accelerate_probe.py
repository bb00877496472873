"""Run ``steer ARGS...`` as one process of an ``accelerate launch`` (or alone), recording what this
process did into ``$STEER_PROBE_DIR/rank-R.json``: the training examples it fetched, in order, and
the artifact writes it made. tests/test_accelerate.py reads these to check the sharding.

    accelerate launch --cpu --num_processes 2 tests/accelerate_probe.py sft --base-model ... --output-dir ...
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path


def main() -> int:
    from transformers import Trainer

    import steer.training.apm as apm
    import steer.training.sft as sft
    from steer.cli import main as cli

    rank = int(os.environ.get("RANK", 0))
    record = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", 1)), "train_ids": [], "writes": []}
    out = Path(os.environ["STEER_PROBE_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    atexit.register(lambda: (out / f"rank-{rank}.json").write_text(json.dumps(record)))

    # The example index of every training item this process loads, in order (the Trainer's
    # train_dataset only: the eval set is fetched by every process in full).
    init = Trainer.__init__

    def tagging_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        state = self.accelerator.state
        record.update(distributed_type=str(state.distributed_type.value), backend=state.backend,
                      num_processes=state.num_processes)
        if self.train_dataset is not None:
            self.train_dataset.probe_ids = record["train_ids"]

    Trainer.__init__ = tagging_init
    for cls in (sft.SftDataset, apm.ApmDataset):
        def getitem(self, i, _original=cls.__getitem__):
            ids = getattr(self, "probe_ids", None)
            if ids is not None:
                ids.append(int(i))
            return _original(self, i)

        cls.__getitem__ = getitem

    def writes(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            record["writes"].append(name)
            return original(*args, **kwargs)

        setattr(module, name, wrapper)

    writes(sft, "save_policy")
    writes(apm, "save_steer_config")
    writes(apm, "save_training_config")
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
