"""Clips/s of python/videodg_reader's `read_frames` on an SSv2-shaped shard.

The shape of `cargo bench --bench prep -- loader_ssv2` (benches/prep.rs): one shard of 1,000
videos of 40 frames, a row group each, 3,000-byte stand-ins for the JPEGs; 100 clips of 5
frames (4, 12, 20, 28, 36) read per round, the videos taken in the same order. The shard is
written here with pyarrow in vdg's schema-3 layout (`image` a {bytes, path} struct) but
fewer columns, so its footer is 0.33 MB where vdg's writer gives the same videos 0.61 MB;
the reader is whichever `videodg_reader` is on the path:

    PYTHONPATH=python python3 scripts/reader_bench.py [--rounds 7] [--shard <frames-NNNNN.parquet>]

`--shard` reads a shard of your own instead (any `vdg prep` output), each video in turn, the 5
frames at vdg's evaluation indices (segment centres; 4, 12, 20, 28, 36 of 40 frames).

Prints the median and the range of clips/s over the rounds (the first round opens the shard).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import videodg_reader
from videodg_reader import Video, read_frames, segment_indices

VIDEOS, FRAMES, JPEG_BYTES, CLIPS = 1000, 40, 3000, 100


def write_shard(path: Path) -> None:
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [("video_id", pa.string()), ("frame_index", pa.int32()), ("image", image)]
    )
    # As vdg writes it: the images uncompressed, without dictionary or statistics.
    with pq.ParquetWriter(
        path,
        schema,
        compression="none",
        use_dictionary=["video_id"],
        write_statistics=["video_id", "frame_index"],
    ) as w:
        for v in range(VIDEOS):
            rows = {
                "video_id": [f"ssv2/{v}.webm"] * FRAMES,
                "frame_index": list(range(FRAMES)),
                "image": [
                    {"bytes": bytes([(v + i) % 256]) * JPEG_BYTES, "path": None}
                    for i in range(FRAMES)
                ],
            }
            w.write_table(pa.Table.from_pydict(rows, schema=schema))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shard", type=Path, help="a frames-NNNNN.parquet written by vdg prep")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        if args.shard:
            prep, name = args.shard.parent, args.shard.name
        else:
            prep, name = Path(d), "frames-00000.parquet"
            write_shard(prep / name)
        meta = pq.ParquetFile(prep / name).metadata
        with open(prep / name, "rb") as f:
            f.seek(-8, 2)
            footer = int.from_bytes(f.read(4), "little")
        shard = int(name.removeprefix("frames-").removesuffix(".parquet"))
        videos = []
        for row, vid in enumerate(pq.read_table(prep / name, columns=["video_id"])[0].to_pylist()):
            if videos and videos[-1].video_id == vid:
                last = videos.pop()
                n = last.num_frames + 1
                videos.append(Video(vid, 0, "x", "d", "train", n, shard, last.first_row))
            else:
                videos.append(Video(vid, 0, "x", "d", "train", 1, shard, row))
        rates = []
        k = 0
        for _ in range(args.rounds):
            t = time.perf_counter()
            for _ in range(CLIPS):
                n = k % len(videos)
                k += 7919
                idx = segment_indices(videos[n].num_frames, 5, False)
                got = read_frames(prep, videos[n], idx)
                if not args.shard:
                    assert got == [bytes([(n + i) % 256]) * JPEG_BYTES for i in idx]
            rates.append(CLIPS / (time.perf_counter() - t))
        print(
            f"videodg_reader {Path(videodg_reader.__file__).parent}: {prep / name}, "
            f"{len(videos)} videos, {meta.num_row_groups} row groups, a footer of "
            f"{footer / 1e6:.2f} MB; read_frames, "
            f"{CLIPS} clips of 5 per round, {args.rounds} rounds: median "
            f"{statistics.median(rates):,.0f} clips/s (range {min(rates):,.0f}-{max(rates):,.0f})"
        )


if __name__ == "__main__":
    main()
