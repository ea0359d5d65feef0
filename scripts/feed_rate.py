"""Feed-only rate of speech-commands training batches: in the process vs DataLoader workers.

Usage: ``python scripts/feed_rate.py DATA_DIR [BATCH] [WORKERS,...]`` where DATA_DIR holds a
Speech Commands tree (``python tests/audio_fixtures.py DATA_DIR 40 4 4`` writes a generated one).
Prints one JSON line per setting, then a summary line; no model runs, only batch building
(augmentation, features, collation) as ``cope train`` does it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from recipes.base import get_recipe, pad_collate
from recipes.engine.config import resolve_config
from recipes.engine.feeding import BatchFeeder
from recipes.engine.sampler import ResumableBatchSampler


def main() -> None:
    data_dir = Path(sys.argv[1])
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    settings = [int(w) for w in sys.argv[3].split(",")] if len(sys.argv) > 3 else [0, 1, 2, 0]
    torch.set_num_threads(1)
    recipe = get_recipe("speech-commands")
    options = {"model.pe": "abs", "train.batch_size": batch}
    config = resolve_config(recipe, preset="kwt1", cli_options=options)
    bundle = recipe.build_data(config, data_dir, False)
    rows = []
    for workers in settings:
        sampler = ResumableBatchSampler(len(bundle.train), batch, 0)
        collate = bundle.collate or pad_collate
        feeder = BatchFeeder(bundle.train, collate, sampler, torch.device("cpu"), workers=workers)
        feeder.next_batch()  # start-up (forking the workers) is not counted
        start = time.perf_counter()
        for _ in range(10):
            feeder.next_batch()
        elapsed = time.perf_counter() - start
        feeder.close()
        row = {"workers": workers, "batch_size": batch, "ms_per_batch": elapsed / 10 * 1e3}
        row["items_per_s"] = 10 * batch / elapsed
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"rows": rows, "load_average": os.getloadavg(), "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
