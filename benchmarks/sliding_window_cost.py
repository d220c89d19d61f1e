"""What one pass saves: model=sliding_window's loop over crops beside its convolutional form.

    OMP_NUM_THREADS=1 python benchmarks/sliding_window_cost.py
    python benchmarks/sliding_window_cost.py --images 200 --rounds 5 --width 16

Both forms score the same windows of 64 x 64 random images with the same (random) weights, in
eval mode; they alternate, 5 rounds, and the table shows each one's median. Windows per image
come from the model (`cost`), FLOPs from torch's FlopCounterMode (convolutions and matrix
products; resizing and cropping not counted). The defaults are configs/model/sliding_window.yaml's.
"""

import argparse
import statistics
import time

import torch

from dlrun.models.sliding_window import SlidingWindow


def timed(model: SlidingWindow, images: torch.Tensor, conv: bool, chunk: int) -> float:
    """Seconds to score every window of every image, `chunk` images a call."""
    start = time.perf_counter()
    with torch.no_grad():
        for part in images.split(chunk):
            model.scores(part, conv)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median)")
    parser.add_argument("--chunk", type=int, default=50, help="images per call")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = SlidingWindow(in_channels=1, image_size=64, num_classes=10, width=args.width)
    model = model.to(args.device).eval()
    images = torch.randn(args.images, 1, 64, 64, device=args.device)
    cost = {conv: model.cost(conv) for conv in (False, True)}
    for conv in (False, True):  # warm-up (kernels, allocator)
        timed(model, images[: args.chunk], conv, args.chunk)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for conv in (False, True):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[conv].append(timed(model, images, conv, args.chunk))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
    print(f"{args.images} images of 64 x 64, width {args.width}, {args.device}, "
          f"{torch.get_num_threads()} thread(s), median of {args.rounds} rounds")  # fmt: skip
    print("| form | windows / image | GFLOPs / image | images / s |")
    print("| --- | --- | --- | --- |")
    for conv, name in ((False, "loop over crops"), (True, "one convolutional pass")):
        rate = args.images / statistics.median(times[conv])
        print(
            f"| {name} | {cost[conv]['windows']} | {cost[conv]['flops'] / 1e9:.4f} | {rate:.1f} |"
        )
    ratio = statistics.median(times[False]) / statistics.median(times[True])
    print(f"convolutional form: {ratio:.1f}x the images per second, "
          f"{cost[False]['flops'] / cost[True]['flops']:.1f}x fewer FLOPs")  # fmt: skip


if __name__ == "__main__":
    main()
