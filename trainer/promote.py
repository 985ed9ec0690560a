"""Promote a trained model to the node: install it where the node's ``model.path`` points.

The node loads ``model.path`` (empty = the shipped default model). ``promote``:

1. checks that the candidate is a readable dicomnode checkpoint that rebuilds (``load_model``);
2. decides the target: ``model.path`` of the config (a ``.pt`` file, or a directory holding
   ``model.pt``); when ``model.path`` is empty, ``<data_dir>/models/model.pt``, and sets ``model.path`` in
   the YAML file to it (only that line changes; comments stay);
3. keeps the model it replaces as ``<target>.previous`` (for a rollback), then installs the candidate
   atomically (copy to a temp file in the same folder, fsync, rename), so a worker never sees half a file,
   and writes its ONNX twin beside it (``model.onnx``, what the node infers with on the CPU); the worker
   reloads the model when either file changes and uses it from the next job on. A running
   worker started with an empty ``model.path`` finds the first promoted model too: before each job it
   resolves its model with :func:`dicomnode.classification.model.node_model_path` (``model.path``, else
   ``<data_dir>/models/model.pt`` when it exists, else the shipped default), so it does not depend on
   the YAML it read at start;
4. copies the candidate's model card (``MODEL_CARD.md``/``.json``) next to the target when there is one
   and appends a line to ``promotions.jsonl`` beside it (time, version, source, sha256, previous version).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger("trainer.promote")

CARD_FILES = ("MODEL_CARD.md", "MODEL_CARD.json")


def target_path(model_path: str, data_dir: Path) -> Path:
    """The checkpoint file the node reads for config value ``model_path`` (see the module docstring)."""
    if not model_path:
        from dicomnode.classification.model.checkpoint import PROMOTED_RELATIVE

        return data_dir / PROMOTED_RELATIVE
    p = Path(model_path).expanduser()
    if p.is_dir() or (not p.exists() and p.suffix == ""):
        return p / "model.pt"
    return p


def _copy_atomic(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}-", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_TOP_MODEL = re.compile(r"^model\s*:\s*(#.*)?$")
_PATH_LINE = re.compile(r"^(\s+)path\s*:.*$")


def set_model_path_in_yaml(config_path: Path, value: str) -> None:
    """Set ``model.path`` in the YAML file to ``value``, changing only that line where it can.

    A ``model:`` block without ``path:`` gets one; a file without ``model:`` gets the block appended; an
    inline ``model: {...}`` mapping is rewritten through the YAML parser (comments of the file are lost
    then). The result is checked by loading it back.
    """
    import yaml

    from dicomnode.config import load_config

    text = config_path.read_text(encoding="utf-8")
    lines = text.splitlines()
    quoted = json.dumps(value)  # a JSON string is a valid double-quoted YAML scalar
    start = next((i for i, line in enumerate(lines) if _TOP_MODEL.match(line)), None)
    if start is None and re.search(r"^model\s*:", text, flags=re.M):
        data = yaml.safe_load(text) or {}
        if not isinstance(data.get("model"), dict):
            data["model"] = {}
        data["model"]["path"] = value
        new_text = yaml.safe_dump(data, sort_keys=False)
    else:
        if start is None:
            lines += ["", "model:", f"  path: {quoted}"]
        else:
            end = start + 1
            while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#"):
                end += 1
            hit = next((i for i in range(start + 1, end) if _PATH_LINE.match(lines[i])), None)
            if hit is not None:
                indent = _PATH_LINE.match(lines[hit]).group(1)
                lines[hit] = f"{indent}path: {quoted}"
            else:
                lines.insert(start + 1, f"  path: {quoted}")
        new_text = "\n".join(lines) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{config_path.name}-", dir=config_path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(new_text)
        got = load_config(tmp).model.path
        if got != value:
            raise ValueError(f"{config_path}: could not set model.path (reads back as {got!r})")
        os.replace(tmp, config_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_model(src: Path, target: Path) -> dict[str, Any]:
    """Install checkpoint ``src`` at ``target`` (keeping the old one as ``.previous``); see the module docstring.

    Returns the promotion record (also appended to ``promotions.jsonl`` beside the target).
    """
    from dicomnode.classification.model import load_model, read_checkpoint, write_onnx_twin
    from dicomnode.classification.model.files import file_sha256

    candidate = load_model(src, device="cpu")  # raises naming the file when it is not a usable checkpoint
    target = target.resolve()
    if target == src.resolve():
        raise ValueError(f"{src} is already the node's model (model.path)")
    previous_version = None
    if target.is_file():
        try:
            previous_version = str(read_checkpoint(target)["version"])
        except (ValueError, FileNotFoundError) as exc:
            log.warning("the model at %s is not readable (%s); replacing it", target, exc)
        _copy_atomic(target, target.with_name(target.name + ".previous"))
    _copy_atomic(src, target)
    write_onnx_twin(target, candidate.net, candidate.version)  # made anew: the candidate may have none
    for name in CARD_FILES:
        card = src.parent / name
        if card.is_file() and card.parent.resolve() != target.parent:
            _copy_atomic(card, target.parent / name)
    record = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": candidate.version,
        "source": str(src.resolve()),
        "target": str(target),
        "sha256": file_sha256(target),
        "previous_version": previous_version,
        "config_updated": False,
    }
    with open(target.parent / "promotions.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    log.info("promoted model %s to %s (previous %s)", candidate.version, target, previous_version)
    return record


def promote(model: str | Path, config_path: str | Path) -> dict[str, Any]:
    """Install checkpoint ``model`` (file or run directory) for the node configured by ``config_path``.

    Returns a dict: time, version, source, target, sha256, previous_version (or None), config_updated.
    Raises ``FileNotFoundError``/``ValueError`` naming the file when the candidate or config is unusable.
    """
    from dicomnode.config import load_config
    from dicomnode.classification.model import checkpoint_path

    src = checkpoint_path(model)
    cfg_file = Path(config_path)
    cfg = load_config(cfg_file)
    target = target_path(cfg.model.path, cfg.resolved_data_dir)
    record = install_model(src, target)
    if not cfg.model.path:
        set_model_path_in_yaml(cfg_file, record["target"])
        record["config_updated"] = True
    return record
