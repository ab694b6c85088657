"""Read a folder written by ``vdg prep`` (or ``vdg features``) from Python, with pyarrow and
Pillow only (and numpy for features).

``VideoClips`` is a map-style dataset (``len`` and indexing, as ``torch.utils.data.Dataset``
expects; PyTorch itself is not needed) of one domain's videos, each item a TSN clip of
``num_segments`` frames and the video's label::

    from videodg_reader import VideoClips
    clips = VideoClips("out", domain="ucf", split="train", num_segments=5, train=True)
    images, label = clips[0]          # 5 PIL images, an int

``VideoFeatures`` gives the same clips from a ``vdg features`` folder, each item a float32
array ``(num_segments, D)`` of the cached features and the label.

Frame indices follow vdg's own loader (``crates/trainer/src/loader.rs``,
``segment_indices``): evaluation takes segment centres, ``int(tick / 2 + k * tick)`` with
``tick = n / M`` (all 0 when ``n <= M``); training takes a random frame in each of ``M``
equal segments (a sorted random subset when segments are shorter than a frame). Training
draws come from Python's seeded ``random.Random``, not vdg's ChaCha stream: same
distribution, other numbers.
"""

from __future__ import annotations

import bisect
import io
import os
import random
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import pyarrow.parquet as pq
from PIL import Image

__all__ = [
    "VideoClips",
    "VideoFeatures",
    "Video",
    "segment_indices",
    "read_frames",
    "read_features",
]


@dataclass(frozen=True)
class Video:
    """One prepared video (a row of ``videos.parquet``)."""

    video_id: str
    label: int
    label_name: str
    domain: str
    split: str
    num_frames: int
    shard: int
    first_row: int


def segment_indices(n: int, m: int, train: bool, rng: Optional[random.Random] = None) -> List[int]:
    """Frame indices of one TSN clip of ``m`` frames from a video of ``n``, as vdg samples."""
    if n <= 0:
        return [0] * m
    if train:
        rng = rng or random.Random(0)
        avg = n // m
        if avg > 0:
            return [k * avg + rng.randrange(avg) for k in range(m)]
        if n > m:
            return sorted(rng.sample(range(n), m))
        return [0] * m
    if n > m:
        tick = n / m
        return [int(tick / 2.0 + k * tick) for k in range(m)]
    return [0] * m


def _values(column):
    """A shard column's values, indexable by row: bytes for ``image``, for ``feature`` the
    rows of a float32 array (``fixed_size_list<float32>[D]``)."""
    if hasattr(column.type, "list_size"):
        import numpy as np  # only features need it

        flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return np.asarray(flat, dtype=np.float32).reshape(-1, column.type.list_size)
    return _image_bytes(column)


def _image_bytes(column) -> list:
    # Shard schema 3: `image` is {bytes, path} (Hugging Face's Image layout); 1 and 2: binary.
    if hasattr(column.type, "num_fields"):
        return column.combine_chunks().field("bytes").to_pylist()
    return column.to_pylist()


class _Shard:
    """One open shard (frames or features): its footer parsed once, and the first row of
    each row group."""

    def __init__(self, path: Path) -> None:
        st = path.stat()
        self.stamp = (st.st_size, st.st_mtime_ns)
        self.file = pq.ParquetFile(path)
        meta = self.file.metadata
        self.starts = [0]
        for g in range(meta.num_row_groups):
            self.starts.append(self.starts[-1] + meta.row_group(g).num_rows)
        self.lock = threading.Lock()

    def read(self, rows: Sequence[int], column: str = "image") -> dict:
        """``column``'s values at the shard's rows ``rows`` (JPEG bytes for ``image``, a float32
        vector for ``feature``), reading only their row groups."""
        groups = {}
        for r in rows:
            g = bisect.bisect_right(self.starts, r) - 1
            if not 0 <= g < len(self.starts) - 1:
                raise IndexError(f"row {r} is outside {self.file.metadata.num_rows} rows")
            groups.setdefault(g, []).append(r)
        out = {}
        with self.lock:
            for g, inside in sorted(groups.items()):
                table = self.file.read_row_group(g, columns=[column])
                values = _values(table.column(column))
                for r in inside:
                    out[r] = values[r - self.starts[g]]
        return out


# Shards opened by this process (keyed by path), the most recently read last; footers are
# parsed once, as vdg's own loader keeps them (a shard of 1,000 short videos, as SSv2's are,
# has 1,000 row groups and a footer of 0.6 MB: with it parsed once instead of per clip, clips
# came 15-22x faster; BENCHMARKS.md). A file whose size or modification time changed is opened again; a forked
# worker (PyTorch's DataLoader) opens its own. Threads share them, one read at a time each.
_OPEN_SHARDS: "OrderedDict[Path, _Shard]" = OrderedDict()
_OPEN_PID = os.getpid()
_OPEN_LOCK = threading.Lock()
_MAX_OPEN_SHARDS = 32


def _shard(path: Path) -> _Shard:
    global _OPEN_PID
    with _OPEN_LOCK:
        if _OPEN_PID != os.getpid():
            _OPEN_SHARDS.clear()
            _OPEN_PID = os.getpid()
        shard = _OPEN_SHARDS.get(path)
        if shard is not None:
            st = path.stat()
            if shard.stamp == (st.st_size, st.st_mtime_ns):
                _OPEN_SHARDS.move_to_end(path)
                return shard
            del _OPEN_SHARDS[path]
        shard = _Shard(path)
        _OPEN_SHARDS[path] = shard
        while len(_OPEN_SHARDS) > _MAX_OPEN_SHARDS:
            _OPEN_SHARDS.popitem(last=False)
        return shard


def _check_indices(video: Video, indices: Sequence[int]) -> None:
    for i in indices:
        if not 0 <= i < video.num_frames:
            raise IndexError(f"frame {i} of {video.video_id}, which has {video.num_frames}")


def read_frames(prep: Path, video: Video, indices: Sequence[int]) -> List[bytes]:
    """The JPEG bytes of frames ``indices`` (within the video, any order, repeats allowed)."""
    _check_indices(video, indices)
    path = Path(prep) / f"frames-{video.shard:05d}.parquet"
    rows = _shard(path).read(sorted({video.first_row + i for i in indices}))
    return [rows[video.first_row + i] for i in indices]


def read_features(features: Path, video: Video, indices: Sequence[int]):
    """The cached features of frames ``indices`` of a ``vdg features`` folder, as a float32
    ``numpy`` array of shape ``(len(indices), D)`` (``video`` from that folder's videos)."""
    import numpy as np

    _check_indices(video, indices)
    path = Path(features) / f"features-{video.shard:05d}.parquet"
    rows = _shard(path).read(sorted({video.first_row + i for i in indices}), "feature")
    return np.stack([rows[video.first_row + i] for i in indices])


class VideoClips:
    """TSN clips of the ok videos of one domain (and source split) of a prepared folder."""

    def __init__(
        self,
        prep: str | Path,
        domain: str,
        split: Optional[str] = None,
        num_segments: int = 5,
        train: bool = False,
        seed: int = 0,
        transform: Optional[Callable[[Image.Image], object]] = None,
    ) -> None:
        self.prep = Path(prep)
        self.num_segments = num_segments
        self.train = train
        self.seed = seed
        self.transform = transform
        rows = pq.read_table(self.prep / "videos.parquet").to_pylist()
        self.videos: List[Video] = [
            Video(
                video_id=r["video_id"],
                label=int(r["label"]),
                label_name=r["label_name"],
                domain=r["domain"],
                split=r["source_split"],
                num_frames=int(r["num_frames"]),
                shard=int(r["shard"]),
                first_row=int(r["first_row"]),
            )
            for r in rows
            if r["status"] == "ok"
            and r["num_frames"] > 0
            and r["domain"] == domain
            and (split is None or r["source_split"] == split)
        ]
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Training draws depend on (seed, epoch, item), like vdg's loader."""
        self._epoch = epoch

    def __len__(self) -> int:
        return len(self.videos)

    def indices(self, i: int) -> List[int]:
        """The frame indices item ``i`` reads."""
        v = self.videos[i]
        rng = random.Random(f"{self.seed}/{self._epoch}/{v.video_id}") if self.train else None
        return segment_indices(v.num_frames, self.num_segments, self.train, rng)

    def __getitem__(self, i: int) -> Tuple[list, int]:
        v = self.videos[i]
        frames = read_frames(self.prep, v, self.indices(i))
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in frames]
        if self.transform is not None:
            images = [self.transform(im) for im in images]
        return images, v.label


class VideoFeatures(VideoClips):
    """The same clips from a ``vdg features`` folder: each item the cached features of the
    clip's frames, a float32 ``numpy`` array ``(num_segments, D)``, and the label. Indices are
    drawn over the cached frames (every ``--every``-th prepared frame), as vdg trains on them.
    ``transform``, if given, is applied to the array."""

    def __getitem__(self, i: int) -> Tuple[object, int]:
        v = self.videos[i]
        x = read_features(self.prep, v, self.indices(i))
        if self.transform is not None:
            x = self.transform(x)
        return x, v.label
