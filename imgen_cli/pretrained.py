"""Third-party weights files (InceptionV3 for FID, VGG16 for the perceptual loss, open_clip checkpoints), loaded
without running code, with every way a file can be wrong said in one sentence.

A `.pt`/`.pth` file is a pickle, and unpickling calls whatever functions the file names: a crafted `__reduce__`
runs `os.system`. torch's `weights_only=True` unpickler builds only tensors and plain containers, and a
safetensors file holds no code at all. open_clip (>= 2.24) loads its checkpoint files with `weights_only=True`
too, so a crafted file given to it fails the same way and `unloadable` words that failure.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from imgen_cli.errors import UserError


def load_state_dict(path: Path, what: str) -> dict[str, Tensor]:
    """A state dict (names -> tensors) from a `.safetensors` file or a torch file; `what` names the flag or
    setting the path came from, for the error."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            with warnings.catch_warnings():  # torch's notes on the pickle protocol: noise beside the real error
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
    # a crafted pickle, a truncated file and a file of another kind raise different types; each means the same
    except Exception as err:
        raise UserError(f"{what} {path} cannot be loaded: {unloadable(err)}.") from None
    if not (isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())):
        raise UserError(f"{what} {path} holds a {type(state).__name__}, not a state dict of named tensors.")
    return state


def unloadable(err: Exception) -> str:
    """Why a weights file did not load, as a clause (torch's own message for a refused pickle suggests loading
    it with `weights_only=False`, which is exactly what must not happen)."""
    if isinstance(err, pickle.UnpicklingError):
        call = re.search(r"GLOBAL ([\w.]+)", str(err))  # "unsupported GLOBAL posix.system whose module ..."
        if call:
            return f"it is a pickle that would call {call.group(1)} when loaded, and imgen loads only tensors"
        return "it is not a tensors-only torch file (damaged, or not a weights file at all)"
    first_sentence = str(err).strip().split("\n")[0].split(". ")[0].rstrip(".")[:160]
    detail = f"{type(err).__name__}: {first_sentence}" if first_sentence else type(err).__name__
    return f"it is damaged or not a weights file ({detail})"


@contextlib.contextmanager
def open_clip_logs_silenced() -> Iterator[None]:
    """open_clip logs each failure on the root logger before raising it; the caller words the raised error as
    its one sentence, so the log line would only be a second, longer copy."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)
