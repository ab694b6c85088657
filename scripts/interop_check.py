"""Reads a `vdg prep` folder with Hugging Face datasets, DuckDB and Polars (scripts/interop-check)."""

import glob
import sys

import duckdb
import polars as pl
import pyarrow.parquet as pq
from datasets import Image, load_dataset

prep, hf = sys.argv[1], sys.argv[2]
frames = sorted(glob.glob(f"{prep}/frames-*.parquet"))
videos = {v["video_id"]: v for v in pq.read_table(f"{prep}/videos.parquet").to_pylist()}
ok = {k: v for k, v in videos.items() if v["status"] == "ok"}

# Hugging Face datasets: the shards themselves, images decoded, no cast.
ds = load_dataset("parquet", data_files=frames, split="train")
assert isinstance(ds.features["image"], Image), ds.features
assert len(ds) == sum(v["num_frames"] for v in ok.values()), (len(ds), len(ok))
for i in (0, len(ds) // 2, len(ds) - 1):
    row = ds[i]
    v = ok[row["video_id"]]
    assert row["image"].size == (v["width"], v["height"]), (row["image"].size, v)
    assert row["image"].mode == "RGB"

# DuckDB and Polars: frames with their labels, domains and splits (datasets.md).
want = sum(
    v["num_frames"] for v in ok.values() if v["domain"] == "ucf" and v["source_split"] == "train"
)
n_duck = duckdb.sql(
    f"select count(*) from '{prep}/frames-*.parquet' f join '{prep}/videos.parquet' v "
    "using (video_id) where v.domain = 'ucf' and v.source_split = 'train'"
).fetchall()[0][0]
n_polars = (
    pl.scan_parquet(f"{prep}/frames-*.parquet")
    .join(pl.scan_parquet(f"{prep}/videos.parquet"), on="video_id")
    .filter((pl.col("domain") == "ucf") & (pl.col("source_split") == "train"))
    .select(pl.len())
    .collect()
    .item()
)
assert n_duck == n_polars == want, (n_duck, n_polars, want)
# `vdg export hf`: one config per domain, labels as a ClassLabel, same frames.
from datasets import ClassLabel  # noqa: E402

for domain in sorted({v["domain"] for v in ok.values()}):
    dd = load_dataset(hf, domain)
    label = dd["train"].features["label"]
    assert isinstance(label, ClassLabel), dd["train"].features
    for split, side in (("train", "train"), ("validation", "val")):
        want_n = sum(
            v["num_frames"] for v in ok.values() if v["domain"] == domain and v["source_split"] == side
        )
        if split not in dd:
            assert want_n == 0, (domain, split, want_n)
            continue
        assert len(dd[split]) == want_n, (domain, split, len(dd[split]), want_n)
        row = dd[split][0]
        assert label.int2str(row["label"]) == ok[row["video_id"]]["label_name"]

print(
    f"ok: datasets {len(ds)} frames as images; duckdb and polars {want} ucf/train frames "
    "with labels joined"
)
