"""Run under torchrun by test_distributed.py: a tiny vqgan trains; rank 0 records, after every step,
a hash of every rank's weights and the sample keys every rank trained on.

args: SHARDS RUN_DIR OUT_JSON ddp|fsdp STEPS"""

import hashlib
import json
import sys

import torch
import torch.distributed as dist
from rich.console import Console

from imgen_cli import registry
from imgen_cli.config import resolve
from imgen_cli.runs import RunDir
from imgen_cli.train import distributed
from imgen_cli.train.loop import StepInfo, train

shards, run_dir, out_path, parallel, steps = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
torch.set_num_threads(1)
fam = registry.get("vqgan")
cfg = resolve("vqgan", fam.config_cls(), fam.presets(), preset="tiny",
              sets=["train.batch_size=8", "train.log_every=1", "train.ckpt_every=2", "train.sample_every=100",
                    "train.val_every=2", f"train.parallel=\"{parallel}\"", "data.num_workers=1",
                    "data.shuffle_buffer=8"],
              flags={"data.shards": shards, "train.steps": steps})
env = distributed.setup("cpu")
record: list[dict] = []


def on_step(info: StepInfo) -> None:
    digest = hashlib.sha256()
    for _, p in sorted(info.model.state_dict().items()):
        p = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shards
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    gathered = distributed.gather_objects({"hash": digest.hexdigest(), "keys": info.keys}, env)
    record.append({"step": info.step, "ranks": gathered})


result = train(cfg, RunDir(run_dir), env, Console(stderr=True), on_step=on_step)
if env.is_main:
    with open(out_path, "w") as fh:
        json.dump({"steps": record, "final_step": result.step, "world_size": env.world_size}, fh)
dist.barrier()
distributed.teardown()
