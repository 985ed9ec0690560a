"""Where checkpoints and their ONNX twins live, and what a checkpoint stores, read without importing torch.

``dicomnode classify`` starts its reader processes (decode + preprocess) before it loads the model; they
need the checkpoint's :class:`PreprocessParams` first, which :func:`read_preprocess` takes from the
checkpoint's pickle with every tensor left out. The node infers with the checkpoint's ONNX twin
(``model.onnx`` beside ``model.pt``, :mod:`.onnx_twin`) on onnxruntime, so it needs the class list and
version the same way (:func:`read_checkpoint_header`), and the twin is used only while its recorded
:func:`file_sha256` of the checkpoint matches the file.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

from dicomnode.classification.imaging.preprocess import PreprocessParams

CHECKPOINT_NAME = "model.pt"
#: Suffix of a checkpoint's ONNX twin (``model.pt`` -> ``model.onnx``).
ONNX_SUFFIX = ".onnx"
#: Metadata key of a twin that holds the SHA-256 of the checkpoint file it was made from.
CHECKPOINT_SHA256_KEY = "dicomnode.checkpoint_sha256"
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


def onnx_twin_path(checkpoint: str | Path) -> Path:
    """The ONNX twin of the checkpoint file ``checkpoint`` (same directory and stem, ``.onnx``)."""
    return Path(checkpoint).with_suffix(ONNX_SUFFIX)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (a twin records its checkpoint's)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def existing_checkpoint(path: str | Path | None) -> Path:
    """The checkpoint file for ``path`` (see :func:`checkpoint_path`); ``FileNotFoundError`` says which
    file is missing and, for the shipped default, what to do."""
    p = checkpoint_path(path)
    if not p.is_file():
        if path is None or str(path) == "":
            raise FileNotFoundError(
                f"no default model is shipped at {p}: train one with `dicomnode train` and set model.path "
                "in the config (or pass --model)")
        raise FileNotFoundError(f"model checkpoint not found: {p}")
    return p


def check_payload(p: Path, payload: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """``payload`` read from checkpoint ``p`` when it is one of this dicomnode's holding ``keys``, else
    ``ValueError`` naming the file and what is wrong."""
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{p}: not a dicomnode checkpoint (format is not {FORMAT!r})")
    if int(payload.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{p}: checkpoint format_version {payload.get('format_version')} is newer than "
                         f"this dicomnode ({FORMAT_VERSION})")
    for key in keys:
        if key not in payload:
            raise ValueError(f"{p}: checkpoint lacks {key!r}")
    return payload


def read_checkpoint_header(path: str | Path | None) -> dict[str, Any]:
    """Everything the checkpoint at ``path`` (None = the shipped model) stores but its tensors (those are
    None), read without torch; ``FileNotFoundError``/``ValueError`` name the file when it is missing or
    not a checkpoint readable that way."""
    p = existing_checkpoint(path)
    try:
        with zipfile.ZipFile(p) as archive:
            name = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
            payload = _NoTensors(archive.open(name)).load()
    except Exception as exc:  # not a zip, another layout, a class outside the list
        raise ValueError(f"{p}: not a dicomnode checkpoint readable without torch ({exc})") from exc
    return check_payload(p, payload, ("version", "classes", "net_config", "preprocess"))


def read_preprocess(path: str | Path | None) -> PreprocessParams | None:
    """The :class:`PreprocessParams` stored in the checkpoint at ``path`` (None = the shipped model), read
    without torch; None when the file cannot be read that way (``load_model`` then reports why)."""
    try:
        return PreprocessParams.from_dict(read_checkpoint_header(path)["preprocess"])
    except Exception:  # missing, not a zip, another layout, a bad value: the slow path reads it with torch
        return None
