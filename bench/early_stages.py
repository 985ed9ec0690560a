"""Where the worker's early path spends its time: each stage of reading and classifying one slice.

Builds the 652-slice series of ``bench/latency.py`` (real slices of four real series of
``../shared/data/ct/series``, new UIDs) in a temporary folder and runs, one thread, file by file, the
stages of :func:`dicomnode.classification.pipeline.classify_files`: for the pydicom path (every file that
is not native little endian), pydicom's read of the whole file, the slice header from the dataset and
decoding to HU; for the native reader (what the early path runs for these files), the header and HU
straight from the bytes; then, for both, preprocessing (resampling), the windows and the shipped model on
onnxruntime (1 thread, batches of 32). Prints seconds and shares per stage and path.
These are the stages that the early classification adds to the CPU while a series arrives
(README, "Time to result").

    python bench/early_stages.py [--count 652]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import pydicom

    import latency
    from dicomnode.classification.imaging.native import read_native_slice
    from dicomnode.classification.imaging.pixels import dataset_to_hu
    from dicomnode.classification.imaging.preprocess import resample_hu, windows_to_channels
    from dicomnode.classification.imaging.series import headers_from_dataset
    from dicomnode.classification.model import load_inference_model, node_model_path, predict_proba

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=652)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="dicomnode-bench-early-"))
    try:
        latency.make_series(latency.source_slices(), root, args.count)
        files = sorted(root.glob("*.dcm"))
        model = load_inference_model(node_model_path(None, root), "cpu", 1)
        for f in files[:20]:  # imports and decoders warmed up; the files are in the page cache as just written
            pydicom.dcmread(f).pixel_array
        stages = dict.fromkeys(["read (pydicom dcmread, whole file)", "slice header from the dataset",
                                "decode to HU", "preprocess (resample)"], 0.0)
        resampled = []
        for f in files:
            t0 = time.perf_counter()
            ds = pydicom.dcmread(str(f))
            t1 = time.perf_counter()
            header = headers_from_dataset(ds, f)[0]
            t2 = time.perf_counter()
            hu = dataset_to_hu(ds, None)
            t3 = time.perf_counter()
            resampled.append(resample_hu(hu, header.spacing_mm, model.preprocess))
            t4 = time.perf_counter()
            for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                stages[name] += seconds
        native_s = 0.0
        for f in files:  # what the early path runs for these (native little-endian) files
            t0 = time.perf_counter()
            read_native_slice(f)
            native_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(0, len(resampled), 32):
            predict_proba(model, windows_to_channels(np.stack(resampled[i:i + 32]), model.preprocess))
        infer_s = time.perf_counter() - t0
        print(f"{len(files)} slices, model {model.version}, load average "
              f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        paths = {"pydicom path (compressed and other files)": {**stages},
                 "native reader (native little-endian files: the early path here)": {
                     "header + HU straight from the bytes (native.read_native_slice)": native_s,
                     "preprocess (resample)": stages["preprocess (resample)"]}}
        for title, path_stages in paths.items():
            path_stages["windows + inference (onnxruntime, 1 thread)"] = infer_s
            total = sum(path_stages.values())
            print(f"{title}:")
            for name, seconds in path_stages.items():
                print(f"  {name:62s} {seconds:6.2f} s  {100 * seconds / total:3.0f}%")
            print(f"  {'total':62s} {total:6.2f} s  ({1000 * total / len(files):.1f} ms per slice)")
        pydicom_s = sum(stages.values()) - stages["preprocess (resample)"]
        print(f"reading + decoding: native reader {native_s:.2f} s, pydicom {pydicom_s:.2f} s "
              f"({pydicom_s / native_s:.1f}x)")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
