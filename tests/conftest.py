"""Shared fixtures: a small shapes dataset in COCO layout and its shards, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from imgen_cli.data.synthetic import write_coco_layout
from imgen_cli.data.tokenize import tokenize

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def shapes_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("coco")
    write_coco_layout(out, n_train=64, n_val=16, size=16, seed=0)
    return out


@pytest.fixture(scope="session")
def shapes_shards(shapes_coco: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    tokenize(shapes_coco, out, size=16, shard_size=16)
    return out
