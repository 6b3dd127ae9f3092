"""(d) The on-device tensor augmentation path vs the PIL pipeline, in images per second.

CIFAR-10-shaped uint8 images in memory, random-crop (padding 4) + horizontal flip +
normalisation, through the DataModule's real training loader and its
``on_after_batch_transfer`` (where the tensor path augments; on this machine the "device"
is the CPU). Both paths run with ``num_workers=0`` so CPU time counts all the work; the
PIL path with worker processes is printed for reference (wall clock only). Target ≥ 10×.

Run:  python -m benchmarks.data_path [--images 10000] [--batch 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._common import SyntheticData, machine, report, setup_threads


def images_per_second(data: SyntheticData) -> tuple[float, float]:
    """(wall, CPU) images/s over one full pass of the training loader."""
    loader = data.train_dataloader()
    n, wall, cpu = 0, time.perf_counter(), time.process_time()
    for batch in loader:
        batch = data.on_after_batch_transfer(batch, 0)
        n += len(batch["image"])
    assert batch["image"].dtype == torch.float32
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=2, help="workers of the reference PIL run")
    args = p.parse_args()
    setup_threads(args.threads)
    print(machine())

    def data(**kwargs) -> SyntheticData:
        d = SyntheticData(num_images=int(args.images / 0.9), batch_size=args.batch, **kwargs)
        d.setup("fit")
        return d

    pil, tensor, pil_workers = data(), data(augment_on_device=True), data(num_workers=args.workers)
    images_per_second(tensor)  # warm-up: first-call allocations
    r_wall, r_cpu, rows = [], [], []
    for _ in range(args.repeats):
        p_w, p_c = images_per_second(pil)
        t_w, t_c = images_per_second(tensor)
        w_w, _ = images_per_second(pil_workers) if args.workers else (float("nan"), 0.0)
        r_wall.append(t_w / p_w)
        r_cpu.append(t_c / p_c)
        rows.append((p_w, p_c, t_w, t_c, w_w))
    med = [statistics.median(r[i] for r in rows) for i in range(5)]
    print(
        f"[CIFAR-10-shaped, {args.images} images, batch {args.batch}] images/s (wall | CPU): "
        f"PIL {med[0]:,.0f} | {med[1]:,.0f}; tensor {med[2]:,.0f} | {med[3]:,.0f}"
        + (f"; PIL with {args.workers} workers {med[4]:,.0f} (wall)" if args.workers else "")
    )
    report("  (d) tensor path / PIL path (images/s)", r_wall, r_cpu, ">= 10")


if __name__ == "__main__":
    main()
