import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imgen_cli.data.shards import exact_loader, open_shards, to_device, train_loader
from imgen_cli.errors import UserError

HERE = Path(__file__).resolve().parent


def test_train_loader_batches_are_typed_and_reproducible(shapes_shards: Path) -> None:
    shards = open_shards(str(shapes_shards), "train")
    batch = next(iter(train_loader(shards, 4, 1, num_workers=0)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 16, 16)
    assert len(batch["caption"]) == 4 and all(isinstance(c, str) and c for c in batch["caption"])
    images = to_device(batch, "cpu")["image"]
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1


@pytest.mark.parametrize("workers", [0, 2])
def test_replay_resumes_the_stream_exactly(shapes_shards: Path, workers: int) -> None:
    shards = open_shards(str(shapes_shards), "train")

    def stream(batches: int, start: int = 0, replay: bool = True) -> list[tuple[list[str], list[str]]]:
        loader = train_loader(shards, 4, batches, seed=3, num_workers=workers, shuffle_buffer=8,
                              start_batch=start, replay=replay)
        return [(list(b["key"]), list(b["caption"])) for b in loader]

    whole = stream(9)
    assert len(whole) == 9 and whole == stream(9)  # same seed: same stream, captions included
    assert stream(4, start=5) == whole[5:]  # fast-forward: continues exactly where it stopped
    assert stream(4, start=5, replay=False) != whole[5:]  # reseeding gives fresh batches


def test_random_caption_choice_covers_the_captions(shapes_shards: Path) -> None:
    shards = open_shards(str(shapes_shards), "train")
    seen: dict[str, set[str]] = {}
    for batch in train_loader(shards, 8, 80, num_workers=0, shuffle_buffer=8):
        for key, caption in zip(batch["key"], batch["caption"], strict=True):
            seen.setdefault(key, set()).add(caption)
    assert max(len(c) for c in seen.values()) >= 3  # not always the first caption


def test_exact_loader_reads_each_sample_once(shapes_shards: Path) -> None:
    shards = open_shards(str(shapes_shards), "train")
    keys = [k for b in exact_loader(shards, 5) for k in b["key"]]
    assert len(keys) == 64 == len(set(keys))
    per_rank = [[k for b in exact_loader(shards, 5, rank=r, world_size=3) for k in b["key"]] for r in range(3)]
    assert sorted(sum(per_rank, [])) == sorted(keys)
    assert [len(k) for k in per_rank] == [22, 21, 21]  # balanced to within one sample


def test_two_rank_torchrun_equal_steps_disjoint_data(shapes_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "keys.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(HERE / "dist_loader_worker.py"), str(shapes_shards), str(out), "7"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    per_rank = json.loads(out.read_text())
    assert [len(steps) for steps in per_rank] == [7, 7]
    for step_a, step_b in zip(*per_rank, strict=True):
        assert len(step_a) == len(step_b) == 4
        assert not set(step_a) & set(step_b)
    # ranks draw from disjoint shard subsets, so they never share a sample at all
    assert not {k for s in per_rank[0] for k in s} & {k for s in per_rank[1] for k in s}


def test_unreadable_shards_fail_instead_of_looping(shapes_shards: Path, tmp_path: Path) -> None:
    import shutil
    import warnings

    import pytest

    from imgen_cli.errors import RunError

    copy = tmp_path / "shards"
    shutil.copytree(shapes_shards, copy)
    shards = open_shards(str(copy), "train")
    (copy / "train-000001.tar").write_bytes(b"garbage, not a tar")  # one bad shard is skipped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert sum(len(b["key"]) for b in train_loader(shards, 4, 20, num_workers=0)) == 80
        for url in shards.urls:
            Path(url).unlink()  # every shard gone: a clear failure, not an endless loop
        with pytest.raises(RunError, match="reads failed in a row"):
            list(train_loader(shards, 4, 3, num_workers=0))


def test_shard_lists_glob_brace_and_pipe(shapes_shards: Path) -> None:
    d = shapes_shards
    by_manifest = open_shards(str(d), "train").urls
    assert open_shards(f"{d}/train-*.tar", "train").urls == by_manifest
    assert open_shards(f"{d}/train-{{000000..000003}}.tar", "train").urls == by_manifest
    piped = open_shards(f"pipe:cat {d}/train-{{000000..000003}}.tar", "train")  # object stores work this way
    assert piped.urls == [f"pipe:cat {u}" for u in by_manifest]
    keys = [k for b in exact_loader(piped, 16) for k in b["key"]]
    assert keys == [k for b in exact_loader(open_shards(str(d), "train"), 16) for k in b["key"]]
    assert sum(len(b["key"]) for b in train_loader(piped, 4, 5, num_workers=0)) == 20
    with pytest.raises(UserError, match="does not exist"):
        open_shards(f"{d}/nothing-{{0..3}}.tar", "train")
