"""Training benchmark: augmentation throughput and training throughput of the ConvNet (images/s).

Inputs are real CT: the slices of ``tests/fixtures/ct/labels.csv`` read and preprocessed exactly as
training and the node do (``trainer.datasets.load_image`` + ``preprocess_batch``), tiled to the batch size.

Measured per device (the CPU; CUDA too when a GPU is present), after ``--warmup`` untimed iterations, in
``--rounds`` interleaved rounds (the median is printed, with the range):

- ``augment``: :func:`trainer.augment.augment_batch` (translation + rotation + thin-plate spline) on a
  batch, images/s (on CUDA with a synchronise before the clock stops);
- ``train step``: forward + cross-entropy + backward + AdamW step of the net (``build_net`` with the
  default config or ``--net-config``), images/s, without and with the augmentation in the step;
- ``inference``: forward in eval mode under no_grad, images/s (for comparison).

    python bench/train.py [--batch-size 64] [--iters 10] [--warmup 2] [--threads 0] [--device auto|cpu|cuda]
                          [--rounds 3] [--net-config JSON] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def real_batch(batch_size: int, params) -> "torch.Tensor":
    """(batch_size, C, S, S) preprocessed real CT slices from the test fixtures, tiled."""
    import torch

    from dicomnode.classification.imaging.preprocess import preprocess_batch
    from trainer.datasets import load_image, read_labels

    rows = read_labels(REPO / "tests" / "fixtures" / "ct" / "labels.csv")
    x = torch.from_numpy(preprocess_batch([load_image(r) for r in rows], params))
    reps = -(-batch_size // x.shape[0])
    return x.repeat(reps, 1, 1, 1)[:batch_size].contiguous()


def _timed(fn, iters: int, warmup: int, device) -> float:
    import torch

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def bench_device(device_name: str, args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from dicomnode.classification.imaging.preprocess import PreprocessParams
    from dicomnode.classification.model import build_net
    from trainer.augment import AugmentParams, augment_batch

    device = torch.device(device_name)
    params = PreprocessParams()
    x = real_batch(args.batch_size, params).to(device)
    y = (torch.arange(args.batch_size) % 5).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    aug = AugmentParams()
    net_config = {"in_channels": params.channels, "input_size": params.size, **json.loads(args.net_config or "{}")}
    net = build_net(net_config).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    n = args.batch_size * args.iters
    result = {"device": str(device), "batch_size": args.batch_size, "iters": args.iters,
              "input": list(x.shape[1:]), "parameters": sum(p.numel() for p in net.parameters())}

    def step(augment: bool) -> None:
        net.train()
        xb = augment_batch(x, gen, aug) if augment else x
        loss = F.cross_entropy(net(xb), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer() -> None:
        net.eval()
        with torch.no_grad():
            net(x)

    def augment_only() -> None:
        with torch.no_grad():
            augment_batch(x, gen, aug)

    measures = {"augment": augment_only, "train": lambda: step(False), "train_with_augment": lambda: step(True),
                "inference": infer}
    # Interleaved rounds, median reported: the machine may be shared, and a burst of other work then hits
    # one round of every measure instead of all rounds of one.
    rates: dict[str, list[float]] = {k: [] for k in measures}
    for r in range(args.rounds):
        for name, fn in measures.items():
            rates[name].append(n / _timed(fn, args.iters, args.warmup if r == 0 else 0, device))
    for name, values in rates.items():
        values.sort()
        result[f"{name}_images_per_s"] = values[len(values) // 2]
        result[f"{name}_images_per_s_range"] = [values[0], values[-1]]
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10, help="timed iterations per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all measures; the median is printed")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--device", default="auto", help="auto (CPU, and CUDA when present), cpu or cuda")
    ap.add_argument("--net-config", metavar="JSON", help="net config overrides")
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "auto" and torch.cuda.is_available() else (
        ["cpu"] if args.device == "auto" else [args.device])
    results = [bench_device(d, args) for d in devices]
    if args.json:
        print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, indent=2))
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s); batch {args.batch_size}, "
          f"{args.rounds} interleaved rounds of {args.iters} timed iterations (median; min-max in brackets), "
          f"load average before: {os.getloadavg()[0]:.2f}")
    if any(r["device"].startswith("cuda") for r in results):
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    print(f"{'device':<8}{'augment':>12}{'train':>12}{'train+aug':>12}{'inference':>12}   (images/s)")
    for r in results:
        print(f"{r['device']:<8}" + "".join(f"{r[k + '_images_per_s']:>12.0f}" for k in
                                            ("augment", "train", "train_with_augment", "inference")))
        print(f"{'':<8}" + "".join(f"{'[%.0f-%.0f]' % tuple(r[k + '_images_per_s_range']):>12}" for k in
                                    ("augment", "train", "train_with_augment", "inference")))
    print(f"net: {results[0]['parameters']} parameters, input {results[0]['input']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
