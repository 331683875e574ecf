"""A plain MONAI 2D baseline: the recipe a MONAI user would write first, nothing tuned.

    python benchmarks/plain_monai.py --train IMG LAB [IMG LAB ...] --minutes M \\
        --predict IMG [IMG ...] --output OUT [OUT ...] [--json RESULT.json]

The recipe, exactly:

- per scan, intensities scaled from the 0.5-99.5 percentiles to [0, 1], clipped
  (``ScaleIntensityRangePercentiles``);
- 2D slices along the axis with the fewest voxels (the sagittal acquisition plane of the
  spine scans: ``array[:, :, i]`` of ``sitk.GetArrayFromImage``), at their native size; every
  slice of every training scan is kept in memory as a tensor;
- 128 x 128 crops, half centred on foreground (``RandCropByPosNegLabeld``, pos=1 neg=1) from
  uniformly drawn slices; no other augmentation;
- MONAI ``UNet`` 2D, channels (16, 32, 64, 128, 256), strides (2, 2, 2, 2), 2 residual units;
  ``DiceCELoss(to_onehot_y=True, softmax=True)``; Adam, learning rate 1e-3; batch 16;
- trained for a wall-clock budget (the clock starts once the slices are in memory and the
  model is built, as the engine's does);
- prediction slice by slice with ``sliding_window_inference`` (roi 128 x 128, overlap 0.5,
  Gaussian blending), argmax, written with the input's exact geometry.

Nothing is saved but the predictions. The last stdout line is ``RESULT <json>``: iterations,
training seconds, the process's peak resident memory at the end of training, and the time
per prediction (``--json`` writes the same object to a file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

PATCH = (128, 128)
BATCH = 16
LEARNING_RATE = 1e-3
CHANNELS = (16, 32, 64, 128, 256)
STRIDES = (2, 2, 2, 2)


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far (VmHWM on Linux, else ru_maxrss), MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2 ** 20 if sys.platform == "darwin" else 1024.0)
    except (ImportError, OSError):
        return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def slice_axis(shape) -> int:
    """The numpy axis with the fewest voxels (the acquisition plane of thick-slab scans)."""
    return int(np.argmin(shape))


def scaled(array: np.ndarray) -> np.ndarray:
    """Per-scan 0.5-99.5 percentile scaling to [0, 1], clipped."""
    from monai.transforms import ScaleIntensityRangePercentiles

    scale = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)
    return np.asarray(scale(array.astype(np.float32)), dtype=np.float32)


def read_scan(path) -> tuple[sitk.Image, np.ndarray]:
    image = sitk.ReadImage(str(path))
    return image, scaled(sitk.GetArrayFromImage(image))


def training_slices(pairs: list[tuple[str, str]]) -> tuple[list[dict], int]:
    """Every slice of every training scan as ``{"image", "label", "fg", "bg"}`` tensors.

    Slices smaller than the crop are zero-padded to it; the foreground/background indices
    that ``RandCropByPosNegLabeld`` would compute per call are computed once here.
    """
    from monai.transforms import FgBgToIndices, SpatialPad

    pad, to_indices = SpatialPad(PATCH), FgBgToIndices()
    slices, num_classes = [], 2
    for image_path, label_path in pairs:
        _, image = read_scan(image_path)
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))).astype(np.int64)
        if label.shape != image.shape:
            raise SystemExit(f"{label_path}: shape {label.shape} differs from its image's {image.shape}")
        num_classes = max(num_classes, int(label.max()) + 1)
        axis = slice_axis(image.shape)
        for img2d, lab2d in zip(np.moveaxis(image, axis, 0), np.moveaxis(label, axis, 0)):
            img = torch.as_tensor(pad(torch.from_numpy(np.ascontiguousarray(img2d))[None]))
            lab = torch.as_tensor(pad(torch.from_numpy(np.ascontiguousarray(lab2d))[None]))
            fg, bg = to_indices(lab)
            slices.append({"image": img, "label": lab, "fg": fg, "bg": bg})
    return slices, num_classes


def build_model(num_classes: int) -> torch.nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=num_classes, channels=CHANNELS,
                strides=STRIDES, num_res_units=2)


def train(pairs: list[tuple[str, str]], minutes: float | None = None, iterations: int | None = None,
          seed: int = 0, device: str = "auto", log=print) -> tuple[torch.nn.Module, dict]:
    """Train the plain recipe on ``pairs`` of (image, label) paths for a wall-clock (or iteration) budget."""
    from monai.data import set_track_meta
    from monai.losses import DiceCELoss
    from monai.transforms import RandCropByPosNegLabeld

    if (minutes is None) == (iterations is None):
        raise ValueError("give exactly one budget: minutes or iterations")
    torch.set_flush_denormal(True)
    torch.manual_seed(seed)
    set_track_meta(False)  # plain tensors: nothing here reads the metadata
    warnings.filterwarnings("ignore", message="Num foregrounds 0")  # slices without foreground: background crops
    dev = resolve_device(device)
    slices, num_classes = training_slices(pairs)
    crop = RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=PATCH, pos=1, neg=1,
                                  num_samples=1, fg_indices_key="fg", bg_indices_key="bg")
    crop.set_random_state(seed)
    rng = np.random.default_rng(seed)
    model = build_model(num_classes).to(dev)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    model.train()
    budget_s = None if minutes is None else minutes * 60.0
    done, losses = 0, []
    start = time.monotonic()
    while (done < iterations) if iterations is not None else (time.monotonic() - start < budget_s):
        crops = [crop(slices[i])[0] for i in rng.integers(len(slices), size=BATCH)]
        x = torch.stack([torch.as_tensor(c["image"]) for c in crops]).to(dev)
        y = torch.stack([torch.as_tensor(c["label"]) for c in crops]).to(dev)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        done += 1
        losses.append(float(loss.detach()))
    seconds = time.monotonic() - start
    info = {"iterations": done, "train_loop_s": round(seconds, 2), "train_end_unix": time.time(),
            "peak_rss_train_mib": peak_rss_mib(), "slices": len(slices), "num_classes": num_classes,
            "final_loss": float(np.mean(losses[-20:])) if losses else None, "device": str(dev)}
    log(f"trained {done} iterations in {seconds:.1f} s on {dev} ({len(slices)} slices, "
        f"loss {info['final_loss'] if info['final_loss'] is not None else float('nan'):.3f})")
    return model, info


@torch.no_grad()
def predict(model: torch.nn.Module, image_path, output_path, device: str = "auto") -> dict:
    """Segment one scan slice by slice; write the labels with the input's exact geometry."""
    from monai.inferers import sliding_window_inference

    start = time.perf_counter()
    dev = resolve_device(device)
    model.eval()
    image, array = read_scan(image_path)
    axis = slice_axis(array.shape)
    stack = np.moveaxis(array, axis, 0)
    out = np.zeros(stack.shape, dtype=np.uint8)
    for k, img2d in enumerate(stack):
        x = torch.from_numpy(np.ascontiguousarray(img2d))[None, None].to(dev)
        with torch.inference_mode():
            logits = sliding_window_inference(x, roi_size=PATCH, sw_batch_size=16, predictor=model,
                                              overlap=0.5, mode="gaussian")
        out[k] = torch.as_tensor(logits).argmax(1)[0].cpu().numpy().astype(np.uint8)
    labels = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(out, 0, axis)))
    labels.CopyInformation(image)
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(labels, str(output_path), True)
    return {"image": str(image_path), "output": str(output_path), "predict_s": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", nargs="+", required=True, metavar="PATH", help="image label [image label ...]")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="wall-clock training budget")
    budget.add_argument("--iterations", type=int, help="iteration budget (for tests)")
    parser.add_argument("--predict", nargs="*", default=[], metavar="IMG", help="scans to segment")
    parser.add_argument("--output", nargs="*", default=[], metavar="OUT", help="one label file per --predict scan")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--json", help="also write the result object here")
    args = parser.parse_args(argv)
    if len(args.train) % 2:
        parser.error("--train takes pairs: image label [image label ...]")
    if len(args.predict) != len(args.output):
        parser.error(f"--predict has {len(args.predict)} scans but --output {len(args.output)} files")
    for path in args.train + args.predict:
        if not Path(path).is_file():
            parser.error(f"{path}: not found")
    pairs = list(zip(args.train[::2], args.train[1::2]))
    model, info = train(pairs, minutes=args.minutes, iterations=args.iterations, seed=args.seed, device=args.device)
    info["predictions"] = [predict(model, image, out, args.device) for image, out in zip(args.predict, args.output)]
    info["peak_rss_mib"] = peak_rss_mib()
    for p in info["predictions"]:
        print(f"wrote {p['output']} in {p['predict_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))
    print("RESULT " + json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
