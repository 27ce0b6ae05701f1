"""Run under torchrun by test_loader.py: each rank streams batches and rank 0 writes what every rank saw."""

import json
import sys

import torch.distributed as dist

from imgen_cli.data.shards import open_shards, train_loader

shards_dir, out_path, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
loader = train_loader(open_shards(shards_dir, "train"), 4, steps, seed=0, rank=rank,
                      world_size=world, num_workers=2, shuffle_buffer=8)
keys = [list(batch["key"]) for batch in loader]
gathered = [None] * world
dist.all_gather_object(gathered, keys)
if rank == 0:
    with open(out_path, "w") as fh:
        json.dump(gathered, fh)
dist.destroy_process_group()
