"""Write synthetic-world shards from the command line.

Usage::

    python -m datamodules.synthetic --out data/synthetic --num 2000 --split train \
        [--seed 0] [--preset cpu|gpu] [--samples-per-shard 100] [--workers 2]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from datamodules.synthetic.generate import write_split
from datamodules.synthetic.world import PRESETS, SPLITS, world_config


def main(argv: Sequence[str] | None = None) -> None:
    """Parse arguments and write the shards of one split."""
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.synthetic",
        description="Write synthetic-world WebDataset shards.",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num", type=int, required=True, help="number of clips")
    parser.add_argument("--split", default="train", choices=sorted(SPLITS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    config = world_config(args.preset)
    paths = write_split(
        args.out, config, args.split, args.num, args.seed, args.samples_per_shard, args.workers
    )
    print(f"wrote {args.num} {args.split} clips in {len(paths)} shards to {args.out}")


if __name__ == "__main__":
    main()
