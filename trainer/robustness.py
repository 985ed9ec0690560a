"""How a model's errors change when the images look as if another scanner had made them.

Each labelled slice is resampled as the trainer holds it (:func:`trainer.datasets.load_resampled`: the
node's ``resample_hu``, rounded to whole HU) and then changed the way another reconstruction kernel or grid would change it: blurred by shrinking it
to 1/f of its size (area average) and enlarging it back (bilinear), sharpened by an unsharp mask, or
given Gaussian noise inside the body. The errors per perturbation (a prediction is right when it is one
of the row's classes, as in ``dicomnode evaluate``) show whether the net reads the image's sharpness as
a sign of the region. README ("How good is the shipped model") gives the figures for the shipped model.

    python -m trainer.robustness --model DIR --labels ../shared/data/ct/labels.csv [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from dicomnode.classification.imaging.preprocess import windows_to_channels
from dicomnode.classification.model import CLASSES, load_model, predict_proba

#: name -> change of body-centred HU (N, S, S); ``gen`` seeds the noise.
Perturbation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def down_up(hu: torch.Tensor, factor: float) -> torch.Tensor:
    """A coarser grid: shrink to ``1/factor`` of the size by area averaging, enlarge back bilinearly."""
    size = hu.shape[-1]
    small = F.interpolate(hu[:, None], size=(round(size / factor),) * 2, mode="area")
    return F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def unsharp(hu: torch.Tensor, amount: float = 0.5) -> torch.Tensor:
    """A sharper kernel: ``hu + amount * (Laplacian sharpening)`` with a 3 x 3 kernel, borders repeated."""
    k = torch.tensor([[0.0, -1.0, 0.0], [-1.0, 4.0, -1.0], [0.0, -1.0, 0.0]])[None, None]
    edges = F.conv2d(F.pad(hu[:, None], (1, 1, 1, 1), mode="replicate"), k)[:, 0]
    return hu + amount * edges


def body_noise(hu: torch.Tensor, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise of ``sigma`` HU on pixels above -900 HU (the air stays air)."""
    return torch.where(hu > -900.0, hu + sigma * torch.randn(hu.shape, generator=gen), hu)


PERTURBATIONS: dict[str, Perturbation] = {
    "none": lambda hu, gen: hu,
    "blur 1.3x": lambda hu, gen: down_up(hu, 1.3),
    "blur 1.5x": lambda hu, gen: down_up(hu, 1.5),
    "blur 1.8x": lambda hu, gen: down_up(hu, 1.8),
    "sharpened": lambda hu, gen: unsharp(hu),
    "noise 10 HU": lambda hu, gen: body_noise(hu, 10.0, gen),
    "noise 25 HU": lambda hu, gen: body_noise(hu, 25.0, gen),
}


def robustness(model: Any, rows: Sequence[Any], seed: int = 0) -> dict[str, Any]:
    """Errors of ``model`` (a LoadedModel) on ``rows`` (``trainer.datasets.LabelRow``) under each of
    :data:`PERTURBATIONS`; rows that cannot be read are listed, not counted."""
    from trainer import datasets as ds

    # the trainer's reader: one read per NIfTI volume, unreadable rows listed by file:line
    resampled, unreadable = ds.load_resampled(rows, model.preprocess)
    bad = {p.split(": cannot read", 1)[0] for p in unreadable}
    keep = [i for i, r in enumerate(rows) if r.where not in bad]
    if not keep:
        raise ValueError("none of the rows could be read")
    kept = [rows[i] for i in keep]
    base = torch.from_numpy(resampled[keep]).float()
    out: dict[str, Any] = {"n": len(kept), "model_version": model.version, "unreadable": unreadable,
                           "errors": {}, "wrong": {}}
    for name, change in PERTURBATIONS.items():
        probs = predict_proba(model, windows_to_channels(change(base, torch.Generator().manual_seed(seed)),
                                                          model.preprocess))
        wrong = [f"{r.where}: {'|'.join(r.classes)} called {CLASSES[int(k)]}"
                 for r, k in zip(kept, probs.argmax(1)) if CLASSES[int(k)] not in r.classes]
        out["errors"][name] = len(wrong)
        out["wrong"][name] = wrong
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trainer.robustness``: errors of a model under blur, sharpening and noise."""
    from trainer.datasets import LabelsError, read_many

    ap = argparse.ArgumentParser(prog="python -m trainer.robustness", description=main.__doc__)
    ap.add_argument("--model", help="checkpoint or run directory (default: the shipped default model)")
    ap.add_argument("--labels", action="append", required=True, metavar="CSV")
    ap.add_argument("--json", action="store_true", help="the whole result, with the wrong rows, as JSON")
    args = ap.parse_args(argv)
    try:
        model = load_model(args.model, device="cpu")
        result = robustness(model, read_many(args.labels))
    except (FileNotFoundError, ValueError, LabelsError) as exc:
        print(f"trainer.robustness: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"model {result['model_version']}  slices {result['n']}  ({len(result['unreadable'])} unreadable)")
        for name, n in result["errors"].items():
            print(f"  {name:<12} {n:>5} wrong")
    return 0


if __name__ == "__main__":
    sys.exit(main())
