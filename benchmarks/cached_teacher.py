"""(c) A KD epoch with the teacher-output cache vs a from-scratch student epoch.

Both train the same student on the same in-memory data (CIFAR-10-shaped random images with
on-device crop + flip in K = 2 deterministic views, or MNIST-shaped without augmentation)
through a Lightning ``Trainer`` (validation, logging, checkpointing off). The KD run fills
the cache during its first K epochs (view = epoch % K); the timed epochs after that read
every teacher output from the cache. Target: cached KD epoch / scratch epoch ≤ 1.2. The
uncached KD epoch is printed for reference.

How: each run also does one hand-written scratch step (``HandScratch``) per batch,
interleaved with its Lightning steps and timed apart; an epoch's time is measured in
units of that yardstick, so the ratio of two runs is free of the machine's drift between
them (epoch-level timings of separate runs varied by ±25 % on a shared VM).

Run:  python -m benchmarks.cached_teacher [--pairs cifar mnist] [--images 1024] [--repeats 2]
"""

from __future__ import annotations

import statistics

from benchmarks._common import (
    PAIRS,
    HandScratch,
    Interleaved,
    SyntheticData,
    base_parser,
    machine,
    quiet_trainer,
    report,
    setup_threads,
    sgd,
)
from kd_lightning.modules import ClassifierModule, DistillationModule
from kd_lightning.modules.performance import Performance
from kd_lightning.modules.teacher import TeacherSpec

VIEWS = 2


def epochs(module, pair: dict, batch: int, images: int, n: int) -> Interleaved:
    data = SyntheticData(
        shape=pair["shape"], num_images=images, batch_size=batch, augment_on_device=True,
        augment_views=VIEWS,
    )
    paired = Interleaved({"yardstick": HandScratch(pair)})
    quiet_trainer(max_epochs=n, callbacks=[paired]).fit(module, data)
    return paired


def epoch_seconds(run: Interleaved) -> list[float]:
    """CPU seconds of each epoch's Lightning steps."""
    return [sum(t[1] for e, t in zip(run.epochs, run.lightning) if e == i) for i in sorted(set(run.epochs))]


def per_epoch(run: Interleaved, skip: int) -> tuple[tuple[float, float], float]:
    """After ``skip`` epochs: the median epoch in yardstick units (wall, CPU) and the
    median epoch's CPU seconds."""
    ratios = run.epoch_ratios("yardstick")[skip:]
    units = tuple(statistics.median(r[k] for r in ratios) for k in (0, 1))
    return units, statistics.median(epoch_seconds(run)[skip:])


def kd_module(pair: dict, cache: bool) -> DistillationModule:
    return DistillationModule(
        student=pair["student"],
        teacher=TeacherSpec(model=pair["teacher"], model_kwargs=pair["teacher_kwargs"], allow_untrained=True),
        num_classes=10, input_shape=pair["shape"], optimizer=sgd,
        performance=Performance(teacher_cache="memory" if cache else "off"),
    )


def main() -> None:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1024, help="training images per epoch (+10%% val)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per run")
    args = p.parse_args()
    setup_threads(args.threads)
    print(machine())
    images = int(args.images / 0.9)  # val_fraction 0.1 is held out of the "train" split
    for name in args.pairs:
        pair = PAIRS[name]
        batch = args.batch or pair["batch"]
        r_wall, r_cpu, ms = [], [], []
        for _ in range(args.repeats):
            cached = kd_module(pair, cache=True)
            kd = epochs(cached, pair, batch, images, VIEWS + args.epochs)
            scratch = epochs(
                ClassifierModule(model=pair["student"], num_classes=10, input_shape=pair["shape"],
                                 optimizer=sgd),
                pair, batch, images, 1 + args.epochs,
            )
            uncached = epochs(kd_module(pair, cache=False), pair, batch, images, 1 + args.epochs)
            (kd_w, kd_c), kd_s = per_epoch(kd, VIEWS)
            (s_w, s_c), s_s = per_epoch(scratch, 1)
            r_wall.append(kd_w / s_w)
            r_cpu.append(kd_c / s_c)
            fill_s = statistics.median(epoch_seconds(kd)[:VIEWS])
            ms.append((kd_s, s_s, per_epoch(uncached, 1)[1], fill_s))
            cache = cached.teacher_cache
            assert cache is not None and cache.hits > 0
        med = [statistics.median(m[i] for m in ms) for i in range(4)]
        print(
            f"[{name}: {pair['teacher']} -> {pair['student']}, batch {batch}, {args.images} images, "
            f"{VIEWS} views] CPU s/epoch: cached KD {med[0]:.2f} (filling epochs {med[3]:.2f}), "
            f"scratch {med[1]:.2f}, uncached KD {med[2]:.2f}; cache {len(cache)} entries, "
            f"{cache.nbytes() / 2**20:.1f} MiB"
        )
        report("  (c) cached-teacher KD epoch / scratch epoch", r_wall, r_cpu, "<= 1.2")


if __name__ == "__main__":
    main()
