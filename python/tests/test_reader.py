"""videodg_reader against vdg's own output on the same indices (run by scripts/interop-check).

A sample is prepared with the ``vdg`` binary (``VDG``, default target/debug/vdg), its frames
exported by vdg (``vdg export lists --frames-dir``: the Rust reader's bytes), and the Python
reader must give the same JPEG bytes and labels for every video, at vdg's evaluation indices.
"""

import io
import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from videodg_reader import VideoClips, read_frames, segment_indices

REPO = Path(__file__).resolve().parents[2]
VDG = os.environ.get("VDG", str(REPO / "target" / "debug" / "vdg"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("vdg")
    run = lambda *a: subprocess.run([VDG, *a], check=True, capture_output=True)  # noqa: E731
    run("sample", "ucf-hmdb", "--out", str(root / "raw"), "--clips-per-class", "2", "--frames", "13")
    run("prep", "ucf-hmdb", "--ucf101", str(root / "raw"), "--hmdb51", str(root / "raw"),
        "--out", str(root / "prep"), "-q")
    run("export", "lists", "--data", str(root / "prep"), "--format", "mmaction",
        "--out", str(root / "lists"), "--frames-dir", str(root / "frames"))
    return root


def test_evaluation_indices_are_vdg_segment_centres():
    # The values of vdg's own unit test (loader.rs, segment_sampling_follows_tsn).
    assert segment_indices(100, 5, False) == [10, 30, 50, 70, 90]
    assert segment_indices(3, 5, False) == [0] * 5
    for seed in range(20):
        import random
        t = segment_indices(100, 5, True, random.Random(seed))
        assert all(k * 20 <= i < k * 20 + 20 for k, i in enumerate(t))


@pytest.mark.parametrize("domain", ["ucf", "hmdb"])
def test_same_frames_and_labels_as_vdg(prepared, domain):
    lists = {}
    for line in (prepared / "lists" / f"ucf_hmdb_{domain}_all.txt").read_text().splitlines():
        frame_dir, n, label = line.rsplit(" ", 2)
        lists[frame_dir] = (int(n), int(label))
    clips = VideoClips(prepared / "prep", domain=domain, num_segments=5)
    assert len(clips) == len(lists)
    for i, v in enumerate(clips.videos):
        assert lists[v.video_id] == (v.num_frames, v.label)
        idx = clips.indices(i)
        ours = read_frames(prepared / "prep", v, idx)
        for k, b in zip(idx, ours):
            assert b == (prepared / "frames" / v.video_id / f"img_{k + 1:05d}.jpg").read_bytes()
        images, label = clips[i]
        assert label == v.label and len(images) == 5
        assert images[0].size == Image.open(io.BytesIO(ours[0])).size


def test_training_draws_are_seeded(prepared):
    a = VideoClips(prepared / "prep", domain="ucf", split="train", train=True, seed=3)
    b = VideoClips(prepared / "prep", domain="ucf", split="train", train=True, seed=3)
    assert [a.indices(i) for i in range(len(a))] == [b.indices(i) for i in range(len(b))]
    a.set_epoch(1)
    assert any(a.indices(i) != b.indices(i) for i in range(len(a)))


def _clip_items(clips, items):
    return [(clips.indices(i), [im.tobytes() for im in clips[i][0]], clips[i][1]) for i in items]


def test_forked_workers_read_the_same_clips(prepared):
    # PyTorch's DataLoader pickles the dataset into forked (or spawned) worker processes; a
    # worker must open its own shards, not use the parent's open files.
    import multiprocessing as mp
    import pickle

    clips = VideoClips(prepared / "prep", domain="hmdb", num_segments=3)
    items = list(range(len(clips)))
    want = _clip_items(clips, items)  # the parent has the shards open before the fork
    for method in ("fork", "spawn"):
        with mp.get_context(method).Pool(2) as pool:
            jobs = [(pickle.loads(pickle.dumps(clips)), [i]) for i in items]
            got = pool.starmap(_clip_items, jobs)
        assert [g[0] for g in got] == want, method


def test_a_rewritten_shard_is_read_again(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from videodg_reader import Video

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

    def write(fill: bytes, n: int) -> None:
        t = pa.table({"image": [{"bytes": fill * (i + 1), "path": None} for i in range(n)]},
                     schema=pa.schema([("image", image)]))
        pq.write_table(t, tmp_path / "frames-00000.parquet", row_group_size=4)

    video = Video("v", 0, "x", "d", "train", num_frames=4, shard=0, first_row=4)
    write(b"a", 12)
    assert read_frames(tmp_path, video, [3, 0, 3]) == [b"aaaaaaaa", b"aaaaa", b"aaaaaaaa"]
    write(b"bb", 8)  # another size: the cached footer must not be used
    assert read_frames(tmp_path, video, [1]) == [b"bb" * 6]
    with pytest.raises(IndexError):
        read_frames(tmp_path, video, [4])
    with pytest.raises(IndexError):
        read_frames(tmp_path, Video("w", 0, "x", "d", "train", 4, 0, 6), [3])


@pytest.fixture(scope="module")
def featured(prepared):
    subprocess.run(
        [VDG, "features", "--data", str(prepared / "prep"), "--backbone", "small_cnn",
         "--input-size", "32", "--every", "2", "--shard-videos", "5", "--out",
         str(prepared / "feat"), "-q"],
        check=True, capture_output=True,
    )
    return prepared / "feat"


def test_features_are_the_rows_an_independent_reader_sees(prepared, featured):
    # DuckDB reads every cached frame of each video; the reader's clips must be those rows.
    import duckdb
    import numpy as np

    from videodg_reader import VideoFeatures, read_features

    frames = {v.video_id: v for v in VideoClips(prepared / "prep", domain="hmdb").videos}
    clips = VideoFeatures(featured, domain="hmdb", num_segments=5)
    assert len(clips) == len(frames) > 5  # over several shards (--shard-videos 5)
    con = duckdb.connect()
    for i, v in enumerate(clips.videos):
        assert v.num_frames == (frames[v.video_id].num_frames + 1) // 2  # --every 2
        got = con.execute(
            f"select frame_index, feature from '{featured}/features-*.parquet' "
            "where video_id = ? order by frame_index", [v.video_id]).fetchall()
        assert [r[0] for r in got] == list(range(v.num_frames))
        want = np.array([got[k][1] for k in clips.indices(i)], dtype=np.float32)
        x, label = clips[i]
        assert x.dtype == np.float32 and x.shape == (5, 256) and label == v.label
        assert np.array_equal(x, want)
        assert np.array_equal(read_features(featured, v, [0, 0]), np.array([got[0][1]] * 2,
                                                                            dtype=np.float32))
