"""Pack a folder of videos and a caption file into WebDataset shards.

Usage::

    python -m datamodules.write_shards --videos clips/ --captions captions.csv --out data/train \
        [--samples-per-shard 100] [--min-frames 16] [--workers 2]

The caption file is a CSV with columns ``file``, ``prompt`` and optionally ``caption``, or a
JSONL file with the same keys (``file`` is relative to ``--videos``). Each valid video becomes
``KEY.<ext>`` (the file's bytes, unchanged), ``KEY.txt`` (the prompt) and ``KEY.json``
(``prompt``, ``caption`` when given, ``source``, ``frames``, ``fps``, ``width``, ``height``).
Rows whose video is missing, undecodable or shorter than ``--min-frames`` are skipped; the
report (printed and written to ``<out>/report.json``) says which and why.

The output folder must be empty (a folder of shards is read as ``*.tar``, so older shards
left there would be trained on too); ``--overwrite`` replaces its ``*.tar`` files and
``report.json`` once the new shards are complete (written as ``.tmp`` files first, so a failed
run leaves the old shards as they were).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import webdataset as wds
from tqdm.auto import tqdm

from lightning_vigu.video_io import VIDEO_EXTENSIONS, VideoDecodeError, probe_video


def read_captions(path: str | Path) -> list[dict]:
    """Rows of a CSV (header ``file,prompt[,caption]``) or JSONL caption file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption file '{path}' does not exist")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exn:
                    raise ValueError(
                        f"{path}:{n} is not valid json ({exn}); write one object per line"
                    ) from exn
        return rows
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"file", "prompt"} <= set(rows[0]):
        raise ValueError(
            f"CSV '{path}' needs the columns 'file' and 'prompt' (found {sorted(rows[0])})"
        )
    return rows


def _check(job: tuple[str, str, int]) -> tuple[dict | None, str | None]:
    """``(video info, None)`` for a usable video, else ``(None, reason)``."""
    path, file, min_frames = job
    if not Path(path).is_file():
        return None, "missing file"
    try:
        info = probe_video(Path(path).read_bytes())
    except VideoDecodeError as exn:
        return None, f"undecodable: {exn}"
    if info["frames"] < min_frames:
        return None, f"too short: {info['frames']} frames < --min-frames {min_frames}"
    return info, None


def _key(file: str, used: set[str]) -> str:
    """A WebDataset key from a file name: no dots or odd characters, unique."""
    base = (
        re.sub(r"[^A-Za-z0-9_-]+", "_", Path(file).with_suffix("").as_posix()).strip("_") or "video"
    )
    key, n = base, 1
    while key in used:
        key, n = f"{base}_{n}", n + 1
    used.add(key)
    return key


def _rows(
    rows: list[dict], videos: Path, min_frames: int, workers: int
) -> Iterator[tuple[dict, dict | None, str | None]]:
    jobs = [
        (str(videos / str(r.get("file") or "")), str(r.get("file") or ""), min_frames) for r in rows
    ]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            yield from zip(rows, *zip(*pool.map(_check, jobs, chunksize=8)))
    else:
        for row, job in zip(rows, jobs):
            yield (row, *_check(job))


def write_shards(
    videos: str | Path,
    captions: str | Path,
    out: str | Path,
    samples_per_shard: int = 100,
    min_frames: int = 16,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Validate the listed videos and write the good ones into ``out/shard-NNNNNN.tar``.

    Args:
        overwrite: replace the ``*.tar`` shards and ``report.json`` of a non-empty ``out``
            (without it, a non-empty ``out`` is refused).

    Returns:
        The report: ``{"written", "shards", "skipped": [{"file", "reason"}],
        "skipped_by_reason", "replaced"}`` (also written to ``out/report.json``).

    Raises:
        FileExistsError: ``out`` is not empty and ``overwrite`` is false.
    """
    videos, out = Path(videos), Path(out)
    if not videos.is_dir():
        raise FileNotFoundError(f"video folder '{videos}' does not exist")
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if existing and not overwrite:
        shown = existing[:5] + ([f"... {len(existing) - 5} more"] if len(existing) > 5 else [])
        raise FileExistsError(
            f"output folder '{out}' is not empty ({shown}); training on it would read the old "
            "shards too. Choose an empty folder, or pass --overwrite (overwrite=True) to replace "
            "its .tar shards and report.json"
        )
    rows = read_captions(captions)
    out.mkdir(parents=True, exist_ok=True)
    replaced = sorted(p for p in out.iterdir() if p.suffix == ".tar" or p.name == "report.json")
    shards: list[Path] = []
    try:
        written, skipped, extensions = _write(
            _rows(rows, videos, min_frames, workers), len(rows), videos, out,
            samples_per_shard, shards, progress,
        )  # fmt: skip
    except BaseException:
        for shard in shards:
            _tmp(shard).unlink(missing_ok=True)
        raise
    for old in replaced:  # the new shards are complete: now drop what they replace
        old.unlink()
    for shard in shards:
        _tmp(shard).replace(shard)
    odd = sorted(extensions - set(VIDEO_EXTENSIONS))
    report = {
        "written": written,
        "shards": [p.name for p in shards],
        "skipped": skipped,
        "skipped_by_reason": dict(Counter(s["reason"].split(":")[0] for s in skipped)),
        "extensions_needing_video_key": odd,
        "replaced": [p.name for p in replaced],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _tmp(shard: Path) -> Path:
    return shard.with_name(shard.name + ".tmp")


def _write(
    checked: Iterator[tuple[dict, dict | None, str | None]],
    total: int,
    videos: Path,
    out: Path,
    samples_per_shard: int,
    shards: list[Path],
    progress: bool,
) -> tuple[int, list[dict], set[str]]:
    """Write the good rows into ``.tar.tmp`` shards (their final paths appended to ``shards``).

    Returns:
        ``(samples written, skipped rows with reasons, video extensions written)``.
    """
    written, sink, skipped, used, extensions = 0, None, [], set(), set()
    for row, info, reason in tqdm(checked, total=total, disable=not progress):
        file, prompt = str(row.get("file") or ""), str(row.get("prompt") or "").strip()
        if reason is None and not prompt:
            reason = "no prompt"
        if reason is not None:
            skipped.append({"file": file, "reason": reason})
            continue
        if written % samples_per_shard == 0:
            if sink is not None:
                sink.close()
            shards.append(out / f"shard-{len(shards):06d}.tar")
            sink = wds.TarWriter(str(_tmp(shards[-1])), encoder=False)
        ext = Path(file).suffix.lower().lstrip(".") or "mp4"
        extensions.add(ext)
        record = {"prompt": prompt, "source": file, **info}
        if row.get("caption"):
            record["caption"] = str(row["caption"]).strip()
        sink.write(
            {
                "__key__": _key(file, used),
                ext: (videos / file).read_bytes(),
                "txt": prompt.encode(),
                "json": json.dumps(record).encode(),
            }
        )
        written += 1
    if sink is not None:
        sink.close()
    return written, skipped, extensions


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m datamodules.write_shards", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--videos", required=True, help="folder holding the videos")
    parser.add_argument(
        "--captions", required=True, help="CSV or JSONL with file, prompt[, caption]"
    )
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--min-frames", type=int, default=16, help="skip videos with fewer frames")
    parser.add_argument("--workers", type=int, default=1, help="processes that validate videos")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the .tar shards and report.json of a non-empty --out",
    )
    args = parser.parse_args(argv)
    report = write_shards(
        args.videos,
        args.captions,
        args.out,
        args.samples_per_shard,
        args.min_frames,
        args.workers,
        overwrite=args.overwrite,
    )
    if report["replaced"]:
        print(f"replaced {len(report['replaced'])} files of {args.out}: {report['replaced']}")
    print(f"wrote {report['written']} samples in {len(report['shards'])} shards to {args.out}")
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])}: {report['skipped_by_reason']}")
        for s in report["skipped"]:
            print(f"  {s['file']}: {s['reason']}")
    if report["extensions_needing_video_key"]:
        print(
            f"note: extensions {report['extensions_needing_video_key']} are not in {list(VIDEO_EXTENSIONS)}; "
            "read them with WebVideoDataModule(video_key=...)"
        )
    print(f"report: {Path(args.out) / 'report.json'}")


if __name__ == "__main__":
    main()
