#!/usr/bin/env python3
"""How far a prepared folder's stored colours are from the exact YUV-to-RGB conversion.

    python3 scripts/colour_bias.py <prepared folder> <raw root> <video id>... [--frame K]

For each video (its `videos.parquet` row names the file, relative to <raw root>/<UCF-101 or
the dataset's folder>; pass the folder holding `rel_path` as <raw root>), frame K (default
10) is decoded by the `ffmpeg` program to its 8-bit planes (yuv420p, yuv422p or yuv444p, as
the source has them) and converted exactly, in float64, with the matrix and range the row
records (chroma repeated, no interpolation). Printed per video: the mean per channel of the
stored JPEG (decoded by Pillow) minus that exact image, in 8-bit levels, and the same for the
`ffmpeg` program's default RGB output. Where the stored frame was resized, the means of the
two images are compared instead. Needs numpy, pyarrow, Pillow and the `ffmpeg` program
(scripts/interop-check's venv has the packages). datasets.md, "How exact the colours are".
"""
import argparse
import glob
import io
import json
import subprocess

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

MATRICES = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722), "bt2020": (0.2627, 0.0593)}


def ffmpeg_frame(path, k, pix_fmt):
    return subprocess.run(
        ["ffmpeg", "-v", "error", "-i", path, "-vf", f"select=eq(n\\,{k})", "-vframes", "1",
         "-f", "rawvideo", "-pix_fmt", pix_fmt, "-"],
        capture_output=True, check=True).stdout


def source_pix_fmt(path):
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream=pix_fmt",
         "-of", "json", path], capture_output=True, check=True).stdout
    return json.loads(out)["streams"][0]["pix_fmt"].replace("yuvj", "yuv")


def exact_rgb(path, k, w, h, matrix, full_range):
    fmt = source_pix_fmt(path)
    if fmt not in ("yuv420p", "yuv422p", "yuv444p"):
        raise SystemExit(f"{path}: {fmt} is not an 8-bit planar YUV format this script converts")
    cw, ch = {"yuv420p": (w // 2, h // 2), "yuv422p": (w // 2, h), "yuv444p": (w, h)}[fmt]
    raw = ffmpeg_frame(path, k, fmt)
    y = np.frombuffer(raw[:w * h], np.uint8).reshape(h, w).astype(float)
    u = np.frombuffer(raw[w * h:w * h + cw * ch], np.uint8).reshape(ch, cw).astype(float)
    v = np.frombuffer(raw[w * h + cw * ch:], np.uint8).reshape(ch, cw).astype(float)
    u = u.repeat(h // ch, 0).repeat(w // cw, 1)
    v = v.repeat(h // ch, 0).repeat(w // cw, 1)
    if full_range:
        Y, Cb, Cr = y, u - 128, v - 128
    else:
        Y, Cb, Cr = (y - 16) * 255 / 219, (u - 128) * 255 / 224, (v - 128) * 255 / 224
    kr, kb = MATRICES[matrix]
    kg = 1 - kr - kb
    r = Y + 2 * (1 - kr) * Cr
    b = Y + 2 * (1 - kb) * Cb
    g = (Y - kr * r - kb * b) / kg
    return fmt, np.clip(np.stack([r, g, b], -1), 0, 255)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("prepared")
    ap.add_argument("raw_root")
    ap.add_argument("video_ids", nargs="+")
    ap.add_argument("--frame", type=int, default=10)
    a = ap.parse_args()
    rows = {r["video_id"]: r for r in pq.read_table(f"{a.prepared}/videos.parquet").to_pylist()}
    wanted = {(v, a.frame) for v in a.video_ids}
    stored = {}
    for f in sorted(glob.glob(f"{a.prepared}/frames-*.parquet")):
        t = pq.read_table(f, columns=["video_id", "frame_index", "image"]).to_pylist()
        for r in t:
            if (r["video_id"], r["frame_index"]) in wanted:
                im = r["image"]
                stored[r["video_id"]] = im["bytes"] if isinstance(im, dict) else im
    for vid in a.video_ids:
        row = rows[vid]
        path = f"{a.raw_root}/{row['rel_path']}"
        w, h = row["source_width"], row["source_height"]
        fmt, exact = exact_rgb(path, a.frame, w, h, row["colour_matrix"],
                               row["colour_range"] == "full")
        ours = np.asarray(Image.open(io.BytesIO(stored[vid])).convert("RGB")).astype(float)
        theirs = np.frombuffer(ffmpeg_frame(path, a.frame, "rgb24"), np.uint8)
        theirs = theirs.reshape(h, w, 3).astype(float)
        same = ours.shape == exact.shape
        bias = (ours - exact).mean((0, 1)) if same else ours.mean((0, 1)) - exact.mean((0, 1))
        print(f"{vid} ({fmt}, {row['colour_matrix']} {row['colour_range']}, stored "
              f"{row['width']}x{row['height']}{'' if same else ', means compared'}): "
              f"vdg - exact {np.round(bias, 2)}, ffmpeg default - exact "
              f"{np.round((theirs - exact).mean((0, 1)), 2)}")


if __name__ == "__main__":
    main()
