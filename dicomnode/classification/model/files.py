"""Where checkpoints live, and the preprocessing a checkpoint stores, read without importing torch.

``dicomnode classify`` starts its reader processes (decode + preprocess) before it imports torch (about
2 s on the 2-core CPU); they need the checkpoint's :class:`PreprocessParams` first, which
:func:`read_preprocess` takes from the checkpoint's pickle with every tensor left out.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

from dicomnode.classification.imaging.preprocess import PreprocessParams

CHECKPOINT_NAME = "model.pt"
FORMAT = "dicomnode-convnet"
FORMAT_VERSION = 1
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default"
UNTRAINED_VERSION = "untrained-test-model"


def checkpoint_path(path: str | Path | None) -> Path:
    """The checkpoint file for ``path`` (None = shipped default; a directory = ``<dir>/model.pt``)."""
    p = DEFAULT_MODEL_DIR / CHECKPOINT_NAME if path is None or str(path) == "" else Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    return p


#: Where ``dicomnode promote`` installs a model when ``model.path`` is empty (relative to ``data_dir``).
PROMOTED_RELATIVE = Path("models") / CHECKPOINT_NAME


def node_model_path(model_path: str | Path | None, data_dir: str | Path) -> Path:
    """The checkpoint file a node uses: ``model.path`` when set; else the model ``promote`` installed in
    ``<data_dir>/models/model.pt`` when there is one; else the shipped default.

    The worker calls this before every job, so the first ``promote`` (which installs into
    ``<data_dir>/models/`` and then writes that path into the YAML) reaches a running worker whose
    in-memory config still has an empty ``model.path``.
    """
    if model_path is not None and str(model_path) != "":
        return checkpoint_path(model_path)
    promoted = Path(data_dir) / PROMOTED_RELATIVE
    return promoted if promoted.is_file() else checkpoint_path(None)


class _NoTensors(pickle.Unpickler):
    """Unpickles a ``torch.save`` payload's plain values; tensors and storages become None, and no class
    outside a short list of containers is ever loaded (nothing of the file is executed)."""

    _ALLOWED = {("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" or module.startswith("torch."):
            return _none
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint")

    def persistent_load(self, pid: Any) -> None:
        return None


def _none(*args: Any, **kwargs: Any) -> None:
    return None


def read_preprocess(path: str | Path | None) -> PreprocessParams | None:
    """The :class:`PreprocessParams` stored in the checkpoint at ``path`` (None = the shipped model), read
    without torch; None when the file cannot be read that way (``load_model`` then reports why)."""
    try:
        with zipfile.ZipFile(checkpoint_path(path)) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            payload = _NoTensors(archive.open(name)).load()
        return PreprocessParams.from_dict(payload["preprocess"])
    except Exception:  # not a zip, another layout, a bad value: the slow path reads it with torch
        return None
