"""Train the ConvNet of :mod:`dicomnode.classification.model` on labelled CT slices.

* Data: labels files read by :mod:`trainer.datasets`, split by patient (deterministic by seed); every
  slice is resampled once to body-centred HU at the model's pixel size and kept in memory (int16).
* Class-balanced sampling: each epoch draws ``per_class`` slices of every class (the paper's N_d per
  class), with replacement; within a class a slice is drawn with weight 1/sqrt(slices of its patient in
  that class), so a patient with 90 slices does not drown 30 patients with one key slice each. A boundary
  slice (``lungs|liver``) sits in both classes' pools and is trained with the label of the pool it was
  drawn from (the paper duplicated such images with each label).
* Input: HU -> the preprocessing windows. A fraction ``clip_prob`` of full-HU slices is clipped to the
  soft-tissue window first (what an 8-bit soft-tissue key slice carries), so the net learns to classify
  slices whose lung and bone channels hold no more than the soft-tissue window; small random HU
  scale/offset; then :func:`trainer.augment.augment_batch` (translation, rotation, thin-plate-spline)
  unless ``--no-augment``.
* Early stopping on the validation split's class-balanced error (mean of the per-class errors; a
  slice is right when the predicted class is one of its labels); the best epoch is kept as ``model.pt``.
* ``state.pt`` holds everything needed to resume (net, optimiser, step, RNG, history).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dicomnode.classification.imaging.preprocess import PreprocessParams, windows_to_channels
from dicomnode.classification.model import CLASSES, build_net, complete_net_config, resolve_device, save_checkpoint
from trainer import datasets as ds

log = logging.getLogger("trainer.train")

STATE_NAME = "state.pt"
MODEL_NAME = "model.pt"
REPORT_NAME = "train_report.json"
SOFT_TISSUE = (-175.0, 275.0)


@dataclass
class TrainSettings:
    """Everything that decides a training run (saved in the report and the checkpoint)."""

    labels: list[str]
    out: str
    epochs: int = 40
    per_class: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.05
    val_fraction: float = 0.2
    seed: int = 0
    patience: int = 8
    max_minutes: float = 0.0
    augment: bool = True
    clip_prob: float = 0.25
    intensity_jitter: bool = True
    exclude_sources: list[str] = field(default_factory=list)  # subgroups left out, e.g. "extra/nifti/ibsi_sts"
    field_augment: bool = True  # field-of-view crops, flips, 8-bit quantisation (trainer.augment.FieldParams)
    zoom_prob: float = 0.15
    average_last: int = 0  # >0: the model is the weight average of the last N epochs (BatchNorm recomputed)
    deterministic: bool = False
    dry_run: bool = False
    dry_run_batches: int = 3
    device: str = "auto"
    threads: int = 0
    skip_unreadable: bool = False
    resume: bool = False
    progress: bool = True
    net_config: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)

    def preprocess_params(self) -> PreprocessParams:
        return PreprocessParams.from_dict(self.preprocess) if self.preprocess else PreprocessParams()

    def full_net_config(self) -> dict[str, Any]:
        pp = self.preprocess_params()
        cfg = {"in_channels": pp.channels, "input_size": pp.size, "num_classes": len(CLASSES)}
        cfg.update(self.net_config)
        return {k: v for k, v in complete_net_config(cfg).items() if not k.startswith("_")}


@dataclass
class Data:
    """Split rows and their resampled HU slices (int16 tensors, N x S x S)."""

    train_rows: list[ds.LabelRow]
    val_rows: list[ds.LabelRow]
    train_hu: torch.Tensor
    val_hu: torch.Tensor
    summary: dict[str, Any]


def seed_everything(seed: int, deterministic: bool) -> torch.Generator:
    """Seed torch/numpy; with ``deterministic`` ask torch for deterministic kernels. Returns the sampler RNG."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def prepare_data(settings: TrainSettings) -> Data:
    """Read and check the labels files, split by patient, resample every slice. ``LabelsError`` if broken."""
    rows = ds.read_many(settings.labels)
    if settings.exclude_sources:  # cross-source runs: leave a source out entirely (no patient of it seen)
        rows = [r for r in rows if not any(r.subgroup == x or r.subgroup.startswith(x.rstrip("/") + "/")
                                           for x in settings.exclude_sources)]
    ds.check_classes(rows, "labels files")
    params = settings.preprocess_params()
    hu, problems = ds.load_resampled(rows, params, progress=settings.progress)
    # Split before leaving unreadable rows out, so that the split depends on the labels files alone
    # (``dicomnode evaluate --split validation`` rebuilds it from them).
    train_rows, val_rows = ds.split_by_patient(rows, settings.val_fraction, settings.seed)
    listed = {"train": len(train_rows), "validation": len(val_rows)}
    if problems:
        if not settings.skip_unreadable:
            raise ds.LabelsError(problems + ["(pass --skip-unreadable to leave these rows out)"])
        for p in problems:
            log.warning("left out: %s", p)
        bad = {p.split(": cannot read", 1)[0] for p in problems}
        train_rows = [r for r in train_rows if r.where not in bad]
        val_rows = [r for r in val_rows if r.where not in bad]
        ds.check_classes(train_rows + val_rows, "readable rows")
    ds.check_classes(train_rows, "training split")
    rows_all = rows
    rows = train_rows + val_rows
    index = {id(r): i for i, r in enumerate(rows_all)}
    ti = [index[id(r)] for r in train_rows]
    vi = [index[id(r)] for r in val_rows]
    summary = {
        "all": ds.summary(rows),
        "train": ds.summary(train_rows),
        "validation": ds.summary(val_rows),
        "split": {"by": "patient", "val_fraction": settings.val_fraction, "seed": settings.seed,
                  "train_patients": len({r.patient for r in train_rows}),
                  "val_patients": len({r.patient for r in val_rows}),
                  "shared_patients": len({r.patient for r in train_rows} & {r.patient for r in val_rows})},
        "left_out_unreadable": problems,
        "split_rows_listed": listed,  # before unreadable rows were left out
        "labels_files": [str(Path(p).resolve()) for p in settings.labels],
    }
    return Data(train_rows, val_rows, torch.from_numpy(hu[ti]), torch.from_numpy(hu[vi]), summary)


def class_pools(rows: Sequence[ds.LabelRow]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per class: (row indices, sampling weights 1/sqrt(slices of that patient in the class))."""
    per_patient: dict[tuple[str, str], int] = defaultdict(int)
    for r in rows:
        for c in r.classes:
            per_patient[(c, r.patient)] += 1
    pools = {}
    for c in CLASSES:
        idx = [i for i, r in enumerate(rows) if c in r.classes]
        w = [1.0 / math.sqrt(per_patient[(c, rows[i].patient)]) for i in idx]
        pools[c] = (torch.tensor(idx, dtype=torch.long), torch.tensor(w, dtype=torch.float64))
    return pools


def sample_epoch(pools: dict[str, tuple[torch.Tensor, torch.Tensor]], per_class: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` draws per class (with replacement), shuffled: (row indices, class targets)."""
    idx, tgt = [], []
    for ci, c in enumerate(CLASSES):
        rows, w = pools[c]
        if len(rows) == 0:
            continue
        pick = torch.multinomial(w, per_class, replacement=True, generator=gen)
        idx.append(rows[pick])
        tgt.append(torch.full((per_class,), ci, dtype=torch.long))
    idx_t, tgt_t = torch.cat(idx), torch.cat(tgt)
    perm = torch.randperm(len(idx_t), generator=gen)
    return idx_t[perm], tgt_t[perm]


def make_inputs(hu: torch.Tensor, params: PreprocessParams, gen: torch.Generator | None = None,
                clip_prob: float = 0.0, jitter: bool = False,
                unknown_spacing: torch.Tensor | None = None, field: Any = None,
                zoom_prob: float = 0.0, targets: torch.Tensor | None = None) -> torch.Tensor:
    """int16 HU (N, S, S) -> float (N, C, S, S).

    With ``gen``: random HU scale/offset (``jitter``), random field-of-view crops, left-right flips and
    8-bit quantisation (``field``, a :class:`trainer.augment.FieldParams`), soft-tissue clipping of a
    ``clip_prob`` fraction, random zoom of the slices flagged in ``unknown_spacing`` (bool (N,)) and of a
    ``zoom_prob`` fraction of the others (a key slice's true scale is unknown; bodies differ in size).
    ``targets`` (class indices) limits the crops to ``field.crop_classes``.
    """
    x = hu.to(torch.float32)
    if gen is not None:
        n = x.shape[0]
        if jitter:
            scale = 1.0 + 0.03 * torch.randn(n, 1, 1, generator=gen)
            offset = 10.0 * torch.randn(n, 1, 1, generator=gen)
            body = x > -900.0  # leave air alone
            x = torch.where(body, x * scale + offset, x)
        if field is not None:
            from trainer.augment import augment_field_of_view

            croppable = None
            if targets is not None:
                croppable = torch.tensor([CLASSES[int(t)] in field.crop_classes for t in targets], dtype=torch.bool)
            x = augment_field_of_view(x, gen, field, params.pad_hu, croppable)
        if zoom_prob > 0:
            extra = torch.rand(n, generator=gen) < zoom_prob
            unknown_spacing = extra if unknown_spacing is None else (unknown_spacing | extra)
        if clip_prob > 0:
            clip = torch.rand(n, generator=gen) < clip_prob
            if bool(clip.any()):
                x[clip] = ds.clip_to_window(x[clip], SOFT_TISSUE)
        if unknown_spacing is not None and bool(unknown_spacing.any()):
            x = random_zoom(x, unknown_spacing, gen, params.pad_hu)
    return windows_to_channels(x, params)


def random_zoom(hu: torch.Tensor, which: torch.Tensor, gen: torch.Generator, pad_hu: float,
                low: float = 0.85, high: float = 1.2) -> torch.Tensor:
    """Zoom the slices flagged in ``which`` by a random factor in [low, high] about the centre.

    Slices of unknown pixel spacing were resampled with the fallback field of view; their true scale is
    uncertain by about this much, so the net is shown them at several scales.
    """
    sel = which.nonzero().flatten()
    f = low + (high - low) * torch.rand(len(sel), generator=gen)
    theta = torch.zeros(len(sel), 2, 3)
    theta[:, 0, 0] = 1.0 / f
    theta[:, 1, 1] = 1.0 / f
    grid = F.affine_grid(theta, [len(sel), 1, hu.shape[-2], hu.shape[-1]], align_corners=False)
    z = F.grid_sample(hu[sel].unsqueeze(1) - pad_hu, grid, align_corners=False).squeeze(1) + pad_hu
    out = hu.clone()
    out[sel] = z
    return out


def _augmenter():
    try:
        from trainer.augment import AugmentParams, augment_batch
    except ImportError:  # augmentation module not there: train without it
        log.warning("trainer.augment not available: training without augmentation")
        return None
    params = AugmentParams()
    return lambda x, gen: augment_batch(x, gen, params)


def evaluate_rows(net: torch.nn.Module, rows: Sequence[ds.LabelRow], hu: torch.Tensor, params: PreprocessParams,
                  device: torch.device, batch_size: int = 256) -> dict[str, Any]:
    """Validation metrics: error, per-class and per-source errors, class-balanced error, mean NLL."""
    net.eval()
    probs = []
    with torch.inference_mode():
        for i in range(0, len(rows), batch_size):
            x = make_inputs(hu[i:i + batch_size], params).to(device)
            probs.append(torch.softmax(net(x).float(), 1).cpu())
    p = torch.cat(probs) if probs else torch.zeros(0, len(CLASSES))
    return metrics_from_probs(rows, p.numpy())


def metrics_from_probs(rows: Sequence[ds.LabelRow], probs: np.ndarray) -> dict[str, Any]:
    """Error counting a slice as right when the argmax is one of its classes; per class and per source."""
    pred = probs.argmax(1) if len(rows) else np.zeros(0, dtype=int)
    right = np.array([CLASSES[k] in r.classes for k, r in zip(pred, rows)], dtype=bool)
    nll = [-math.log(max(float(sum(probs[i, CLASSES.index(c)] for c in r.classes)), 1e-12))
           for i, r in enumerate(rows)]
    per_class = {}
    for c in CLASSES:
        m = np.array([c in r.classes for r in rows], dtype=bool)
        per_class[c] = {"n": int(m.sum()), "patients": len({r.patient for r, k in zip(rows, m) if k}),
                        "error": float(1.0 - right[m].mean()) if m.any() else None}
    per_source: dict[str, Any] = {}
    for key in ("group", "subgroup"):
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            groups[getattr(r, key)].append(i)
        for g, ii in sorted(groups.items()):
            per_source[g] = {"n": len(ii), "patients": len({rows[i].patient for i in ii}),
                             "error": float(1.0 - right[ii].mean())}
    errs = [v["error"] for v in per_class.values() if v["error"] is not None]
    confusion = np.zeros((len(CLASSES), len(CLASSES)), dtype=int)  # rows: first label, cols: predicted
    for k, r in zip(pred, rows):
        truth = CLASSES[k] if CLASSES[k] in r.classes else r.classes[0]
        confusion[CLASSES.index(truth), k] += 1
    return {"n": len(rows), "error": float(1.0 - right.mean()) if len(rows) else None,
            "balanced_error": float(np.mean(errs)) if errs else None,
            "nll": float(np.mean(nll)) if nll else None,
            "per_class": per_class, "per_source": per_source,
            "confusion": {"classes": list(CLASSES), "matrix": confusion.tolist()}}


def learning_rate(peak: float, progress: float, warmup: float = 0.05, floor: float = 0.02) -> float:
    """Linear warm-up over the first ``warmup`` of training, then cosine decay to ``floor * peak``.

    ``progress`` runs from 0 to 1 (steps done / steps planned, or time used / time budget if larger).
    """
    if progress < warmup:
        return peak * max(progress / warmup, 0.01)
    t = min(1.0, (progress - warmup) / (1.0 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def _add_weights(total: dict[str, torch.Tensor] | None, net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``total`` plus the floating-point weights of ``net`` (float64 on the CPU; BatchNorm statistics and
    counters are left out: they are recomputed for the average)."""
    weights = {k: v.detach().to("cpu", torch.float64) for k, v in net.state_dict().items()
               if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))}
    if total is None:
        return weights
    return {k: total[k] + v for k, v in weights.items()}


def _averaged_net(net_config: dict[str, Any], total: dict[str, torch.Tensor], n: int,
                  device: torch.device) -> torch.nn.Module:
    net = build_net(net_config)
    state = net.state_dict()
    state.update({k: (v / n).to(state[k].dtype) for k, v in total.items()})
    net.load_state_dict(state)
    return net.to(device)


def recompute_batchnorm(net: torch.nn.Module, batches: Iterable[torch.Tensor]) -> None:
    """Set every BatchNorm's running statistics to the plain average over ``batches`` (training inputs):
    the statistics of averaged weights are not the average of the epochs' statistics."""
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        for x in batches:
            net(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    net.eval()


def _version(net: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return f"convnet-{datetime.now(timezone.utc):%Y%m%d}-{h.hexdigest()[:10]}"


def _save_state(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def train(settings: TrainSettings) -> dict[str, Any]:
    """Run (or resume) a training; returns the report (also written to ``<out>/train_report.json``)."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_NAME
    if state_path.exists() and not settings.resume:
        raise ValueError(f"{out} already holds a training state ({STATE_NAME}): pass --resume to continue it "
                         "or choose another --out")
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    gen = seed_everything(settings.seed, settings.deterministic)
    device = resolve_device(settings.device)
    params = settings.preprocess_params()
    net_config = settings.full_net_config()
    t0 = time.time()
    data = prepare_data(settings)
    log.info("data read in %.1f s: %d train / %d validation slices; classes %s; patients per class %s",
             time.time() - t0, len(data.train_rows), len(data.val_rows), data.summary["train"]["class_counts"],
             data.summary["train"]["patients_per_class"])
    net = build_net(net_config).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    epochs = 1 if settings.dry_run else settings.epochs
    steps_per_epoch = math.ceil(settings.per_class * len(CLASSES) / settings.batch_size)
    if settings.dry_run:
        steps_per_epoch = min(steps_per_epoch, settings.dry_run_batches)
    total_steps = max(1, epochs * steps_per_epoch)
    step = 0
    elapsed = 0.0  # training seconds so far (all runs of this state)
    budget_s = 60.0 * settings.max_minutes
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    start_epoch, bad_epochs = 0, 0
    average_from = epochs - settings.average_last if settings.average_last > 0 else None
    average: dict[str, torch.Tensor] | None = None  # running sum of the weights of the epochs averaged
    averaged = 0
    if settings.average_last < 0 or settings.average_last > epochs:
        raise ValueError(f"average_last must be between 0 and the number of epochs ({epochs}), "
                         f"got {settings.average_last}")
    if state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        net.load_state_dict(st["net"])
        opt.load_state_dict(st["opt"])
        step = int(st["step"])
        elapsed = float(st["elapsed"])
        gen.set_state(st["gen"])
        torch.set_rng_state(st["torch_rng"])
        history = json.loads(st["history"])
        best = json.loads(st["best"]) if st["best"] else None
        start_epoch, bad_epochs = int(st["epoch"]) + 1, int(st["bad_epochs"])
        average, averaged = (st.get("average") or None), int(st.get("averaged", 0))
        log.info("resumed from %s at epoch %d", state_path, start_epoch)
    augment = _augmenter() if settings.augment else None
    field = None
    if settings.augment and settings.field_augment:
        from trainer.augment import FieldParams

        field = FieldParams()
    refit = not data.val_rows
    if refit:  # --val-fraction 0: no patient is held out, so there is nothing to choose an epoch on
        log.info("no validation split (val_fraction %s): training all %d epochs; the model is the %s",
                 settings.val_fraction, epochs,
                 f"average of the last {settings.average_last}" if settings.average_last else "last epoch")
    pools = class_pools(data.train_rows)
    unknown = torch.tensor([r.kind == "image" for r in data.train_rows], dtype=torch.bool)  # no pixel spacing
    val_rows, val_hu = data.val_rows, data.val_hu
    if settings.dry_run:
        stride = max(1, len(val_rows) // 64)  # a spread of sources, not the first file only
        val_rows, val_hu = val_rows[::stride][:64], val_hu[::stride][:64]
    train_time = 0.0
    from tqdm import tqdm

    def training_inputs(rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The augmented net inputs of training rows ``rows`` drawn for classes ``targets``."""
        x = make_inputs(data.train_hu[rows], params, gen, settings.clip_prob, settings.intensity_jitter,
                        unknown[rows], field, settings.zoom_prob, targets).to(device)
        return augment(x, gen) if augment is not None else x

    for epoch in range(start_epoch, epochs):
        if not refit and bad_epochs >= settings.patience:
            log.info("early stop: no improvement for %d epochs", bad_epochs)
            break
        if budget_s > 0 and elapsed >= budget_s:
            log.info("time budget of %.0f min used up", settings.max_minutes)
            break
        te = time.time()
        net.train()
        idx, tgt = sample_epoch(pools, settings.per_class, gen)
        n_batches = math.ceil(len(idx) / settings.batch_size)
        if settings.dry_run:
            n_batches = min(n_batches, settings.dry_run_batches)
        total, seen, correct = 0.0, 0, 0
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                   disable=not settings.progress)
        for b in bar:
            sl = slice(b * settings.batch_size, (b + 1) * settings.batch_size)
            x = training_inputs(idx[sl], tgt[sl])
            y = tgt[sl].to(device)
            logits = net(x)
            loss = F.cross_entropy(logits, y, label_smoothing=settings.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            progress = step / total_steps
            if budget_s > 0:
                progress = max(progress, (elapsed + time.time() - te) / budget_s)
            for group in opt.param_groups:
                group["lr"] = learning_rate(settings.lr, progress)
            opt.step()
            step += 1
            total += float(loss.detach()) * len(y)
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{total / seen:.3f}", acc=f"{correct / seen:.3f}")
        bar.close()
        if average_from is not None and epoch >= average_from:
            average, averaged = _add_weights(average, net), averaged + 1
        metrics = None if refit else evaluate_rows(net, val_rows, val_hu, params, device)
        train_time += time.time() - te
        elapsed += time.time() - te
        rec = {"epoch": epoch + 1, "train_loss": total / max(seen, 1), "train_acc": correct / max(seen, 1),
               "val_error": metrics["error"] if metrics else None,
               "val_balanced_error": metrics["balanced_error"] if metrics else None,
               "val_nll": metrics["nll"] if metrics else None,
               "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - te, 1)}
        history.append(rec)
        if refit:
            improved, score = True, None  # every epoch replaces the model; the last one stays
        else:
            score = [metrics["balanced_error"] if metrics["balanced_error"] is not None else 1.0,
                     metrics["nll"] or 0.0]
            improved = best is None or score < list(best["score"])
        if improved:
            bad_epochs = 0
            version = _version(net)
            best = {"epoch": epoch + 1, "score": score, "version": version, "metrics": metrics}
            save_checkpoint(out / MODEL_NAME, net, net_config, params, version,
                            extra={"training": _training_facts(settings, data.summary, best, history)})
        else:
            bad_epochs += 1
        if refit:
            log.info("epoch %d: loss %.3f, no validation (%.0f s)", epoch + 1, rec["train_loss"], rec["seconds"])
        else:
            log.info("epoch %d: loss %.3f, val error %.4f, balanced %.4f, nll %.3f%s (%.0f s)", epoch + 1,
                     rec["train_loss"], rec["val_error"] or 0, rec["val_balanced_error"] or 0, rec["val_nll"] or 0,
                     " *" if improved else "", rec["seconds"])
        _save_state(state_path, {"net": net.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                                 "gen": gen.get_state(), "torch_rng": torch.get_rng_state(), "epoch": epoch,
                                 "bad_epochs": bad_epochs, "history": json.dumps(history),
                                 "best": json.dumps(best) if best else "",
                                 "average": average or {}, "averaged": averaged})
    if average_from is not None:
        if averaged == settings.average_last:
            net = _averaged_net(net_config, average, averaged, device)
            idx, tgt = sample_epoch(pools, settings.per_class, gen)
            recompute_batchnorm(net, (training_inputs(idx[i:i + settings.batch_size], tgt[i:i + settings.batch_size])
                                      for i in range(0, len(idx), settings.batch_size)))
            metrics = None if refit else evaluate_rows(net, val_rows, val_hu, params, device)
            best = {"epoch": len(history), "averaged_epochs": [average_from + 1, epochs], "score": None,
                    "version": _version(net), "metrics": metrics}
            save_checkpoint(out / MODEL_NAME, net, net_config, params, best["version"],
                            extra={"training": _training_facts(settings, data.summary, best, history)})
            log.info("the model is the weight average of epochs %d-%d%s", average_from + 1, epochs,
                     "" if refit else f": val error {metrics['error']:.4f}, balanced {metrics['balanced_error']:.4f}")
        else:
            log.warning("the run stopped after %d of the last %d epochs that were to be averaged: the model is "
                        "the best single epoch", averaged, settings.average_last)
    report = _training_facts(settings, data.summary, best, history)
    report["train_seconds_this_run"] = round(train_time, 1)
    report["threads"] = torch.get_num_threads()
    report["device"] = str(device)
    tmp = out / (REPORT_NAME + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / REPORT_NAME)
    return report


def _training_facts(settings: TrainSettings, summary: dict[str, Any], best: dict[str, Any] | None,
                    history: list[dict[str, Any]]) -> dict[str, Any]:
    s = asdict(settings)
    s["net_config"] = settings.full_net_config()
    s["preprocess"] = settings.preprocess_params().to_dict()
    s["augmentation"] = "translation+rotation+thin-plate-spline (trainer.augment)" if settings.augment else "none"
    if settings.augment and settings.field_augment:
        from trainer.augment import FieldParams

        s["augmentation"] += " + field-of-view crops, left-right flips, random kernels, 8-bit quantisation"
        s["field_augment_params"] = FieldParams().to_dict()
    return {"settings": s, "data": summary,
            "best_epoch": best["epoch"] if best else None,
            "averaged_epochs": best.get("averaged_epochs") if best else None,
            "version": best["version"] if best else None,
            "validation": best["metrics"] if best else None,
            "history": history}
