"""Writing demonstrations as a LeRobot v3.0 dataset, which LeRobot's own tools and `lerobot_format` read.

    write_lerobot_dataset(rows, "data/tabletop", fps=10)                         # mp4 video (AV1), the default
    write_lerobot_dataset(rows, "data/tabletop", fps=10, image_storage="image")  # lossless PNG inside the parquet

`rows` is a `datasets.Dataset` of the project's demonstrations (image, instruction, action, episode, step). The folder
gets LeRobot's v3.0 layout: `meta/info.json`, `meta/stats.json`, `meta/tasks.parquet`,
`meta/episodes/chunk-000/file-000.parquet`, `data/chunk-000/file-NNN.parquet` and, for video,
`videos/<camera>/chunk-000/file-NNN.mp4`, where an episode occupies `[from_timestamp, to_timestamp)` of its file.
Frames carry LeRobot's bookkeeping fields: `timestamp`, `frame_index`, `episode_index`, `index`, `task_index`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd

IMAGE_STORAGES = ("video", "image")
DEFAULT_CAMERA = "observation.images.main"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
QUANTILES = {"q01": 0.01, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q99": 0.99}
INDEX_FEATURES = {"timestamp": "float32", "frame_index": "int64", "episode_index": "int64", "index": "int64", "task_index": "int64"}


class Mp4Encoder:
    """Encodes RGB frames `[height, width, 3]` uint8 into one mp4 file with PyAV, frame `i` at time `i / fps`.

    Args:
        codec: `libsvtav1` (AV1, LeRobot's default) or `libx264` (H.264).
        crf: constant rate factor; lower is closer to the source.
        gop: frames between keyframes (2, as LeRobot, so any frame decodes quickly).
    """

    def __init__(self, path: Path, fps: int, height: int, width: int, codec: str = "libsvtav1", crf: int = 20, gop: int = 2):
        import av

        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream(codec, rate=fps, options={"g": str(gop), "crf": str(crf)})
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.frames = 0

    def add(self, frame: np.ndarray) -> None:
        import av

        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        video_frame.pts = self.frames
        self.container.mux(self.stream.encode(video_frame))
        self.frames += 1

    def close(self) -> None:
        self.container.mux(self.stream.encode())
        self.container.close()


def _feature_stats(values: np.ndarray, quantiles: bool) -> dict[str, list]:
    """LeRobot's per-feature statistics of `values` `[rows, ...]` (over rows)."""
    stats = {
        "min": values.min(0).tolist(),
        "max": values.max(0).tolist(),
        "mean": values.mean(0).tolist(),
        "std": values.std(0).tolist(),
        "count": [int(len(values))],
    }
    if quantiles:
        stats |= {name: np.quantile(values, q, axis=0).tolist() for name, q in QUANTILES.items()}
    return stats


def _image_stats(frames: list[np.ndarray]) -> dict[str, list]:
    """Per-channel statistics of frames scaled to [0, 1], shaped `[3, 1, 1]` as LeRobot stores them."""
    pixels = np.stack(frames).reshape(-1, 3).astype(np.float64) / 255.0
    return {key: np.asarray(value).reshape(-1, 1, 1).tolist() if key != "count" else [len(frames)] for key, value in _feature_stats(pixels, False).items()}


def _checked_rows(rows: datasets.Dataset, image_column: str, action_column: str, instruction_column: str, episode_column: str) -> tuple[np.ndarray, np.ndarray]:
    """The episode ids and the actions `[rows, action_dim]`, checked; raises ValueError naming what is wrong."""
    missing = [c for c in (image_column, action_column, instruction_column, episode_column) if c not in rows.column_names]
    if missing:
        raise ValueError(f"The demonstrations have no column(s) {missing}; their columns are {rows.column_names}.")
    if len(rows) == 0:
        raise ValueError("The demonstrations are empty; there is nothing to write.")
    actions = rows[action_column]
    lengths = sorted({len(action) for action in actions})
    if len(lengths) != 1:
        raise ValueError(f"Actions have different lengths {lengths}; every action must have the same dimension.")
    actions = np.asarray(actions, dtype=np.float32)
    bad = np.argwhere(~np.isfinite(actions))
    if len(bad):
        raise ValueError(f"Row {bad[0][0]} of {action_column!r} holds NaN or inf ({actions[bad[0][0]].tolist()}); clean the data first.")
    return np.asarray(rows[episode_column]), actions


def write_lerobot_dataset(
    rows: datasets.Dataset,
    output_dir: str | Path,
    fps: int,
    image_storage: str = "video",
    camera: str = DEFAULT_CAMERA,
    robot_type: str | None = None,
    episodes_per_file: int = 1000,
    codec: str = "libsvtav1",
    crf: int = 20,
    image_column: str = "image",
    instruction_column: str = "instruction",
    action_column: str = "action",
    episode_column: str = "episode",
    step_column: str = "step",
) -> Path:
    """Write `rows` (one per step) as a LeRobot v3.0 dataset in the new folder `output_dir`.

    Episodes are numbered 0, 1, ... in the order of their ids, frames within an episode by `step_column` (row order
    when there is none); each instruction becomes a task. The folder appears only when it is complete.

    Returns:
        `output_dir`.

    Raises:
        ValueError: `image_storage` is not 'video' or 'image', `output_dir` exists and is not empty, a column is
            missing, or the actions differ in length or hold NaN/inf.
        FileExistsError: another process completed `output_dir` while this one wrote it.
    """
    if image_storage not in IMAGE_STORAGES:
        raise ValueError(f"--image_storage {image_storage!r} is not one of {list(IMAGE_STORAGES)}: 'video' (mp4) or 'image' (lossless, in the parquet).")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ValueError(f"{str(output_dir)!r} exists and is not empty; write the dataset to a new folder or remove that one.")
    episode_ids, actions = _checked_rows(rows, image_column, action_column, instruction_column, episode_column)
    steps = np.asarray(rows[step_column]) if step_column in rows.column_names else np.arange(len(rows))
    order = np.lexsort((steps, episode_ids))
    _, episode_of_row = np.unique(episode_ids[order], return_inverse=True)
    instructions = rows[instruction_column]
    tasks = list(dict.fromkeys(instructions[i] for i in order))
    task_index = {task: i for i, task in enumerate(tasks)}

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        writer = _V30Writer(staging, fps, image_storage, camera, episodes_per_file, codec, crf)
        images = rows.select_columns([image_column])
        starts = np.flatnonzero(np.r_[True, np.diff(episode_of_row) != 0])
        for episode, (start, end) in enumerate(zip(starts, np.r_[starts[1:], len(order)])):
            episode_rows = order[start:end]
            frames = [np.asarray(images[int(i)][image_column].convert("RGB")) for i in episode_rows]
            episode_tasks = [task_index[instructions[i]] for i in episode_rows]
            writer.add_episode(episode, frames, actions[episode_rows], episode_tasks, tasks)
        writer.finish(tasks, robot_type, actions)
        if output_dir.exists() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        try:
            staging.rename(output_dir)
        except OSError as error:
            raise FileExistsError(f"{str(output_dir)!r} was written by another process meanwhile.") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


class _V30Writer:
    """Accumulates episodes into data parquet files (and mp4 files), then writes the metadata."""

    def __init__(self, root: Path, fps: int, image_storage: str, camera: str, episodes_per_file: int, codec: str, crf: int):
        self.root, self.fps, self.image_storage, self.camera = root, fps, image_storage, camera
        self.episodes_per_file, self.codec, self.crf = episodes_per_file, codec, crf
        self.buffer: dict[str, list] = {}
        self.episodes: list[dict[str, Any]] = []
        self.encoder: Mp4Encoder | None = None
        self.file_index = 0
        self.total_frames = 0
        self.image_shape: tuple[int, ...] | None = None
        self.stat_frames: list[np.ndarray] = []
        self.index_values: dict[str, list] = {name: [] for name in INDEX_FEATURES}

    def add_episode(self, episode: int, frames: list[np.ndarray], actions: np.ndarray, task_indices: list[int], tasks: list[str]) -> None:
        if self.image_shape is None:
            self.image_shape = frames[0].shape
        if episode and episode % self.episodes_per_file == 0:
            self._flush()
        length = len(frames)
        record = {
            "episode_index": episode,
            "tasks": [tasks[i] for i in dict.fromkeys(task_indices)],
            "length": length,
            "data/chunk_index": 0,
            "data/file_index": self.file_index,
            "dataset_from_index": self.total_frames,
            "dataset_to_index": self.total_frames + length,
        }
        columns = {
            "action": actions.tolist(),
            "timestamp": (np.arange(length, dtype=np.float32) / self.fps).tolist(),
            "frame_index": list(range(length)),
            "episode_index": [episode] * length,
            "index": list(range(self.total_frames, self.total_frames + length)),
            "task_index": task_indices,
        }
        if self.image_storage == "video":
            if self.encoder is None:
                path = self.root / VIDEO_PATH.format(video_key=self.camera, chunk_index=0, file_index=self.file_index)
                height, width = self.image_shape[:2]
                self.encoder = Mp4Encoder(path, self.fps, height, width, self.codec, self.crf)
            start = self.encoder.frames / self.fps
            for frame in frames:
                self.encoder.add(frame)
            record |= {
                f"videos/{self.camera}/chunk_index": 0,
                f"videos/{self.camera}/file_index": self.file_index,
                f"videos/{self.camera}/from_timestamp": start,
                f"videos/{self.camera}/to_timestamp": start + length / self.fps,
            }
        else:
            columns = {self.camera: frames, **columns}
        for name, values in columns.items():
            self.buffer.setdefault(name, []).extend(values)
            if name in self.index_values:
                self.index_values[name].extend(values)
        record |= {f"stats/action/{k}": v for k, v in _feature_stats(actions.astype(np.float64), False).items()}
        record |= {"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
        self.episodes.append(record)
        self.stat_frames.extend(frames[:: max(1, length // 4)][:4])
        self.total_frames += length

    def _features(self, action_dim: int) -> dict[str, dict]:
        height, width, channels = self.image_shape
        camera = {"dtype": self.image_storage, "shape": [height, width, channels], "names": ["height", "width", "channels"]}
        if self.image_storage == "video":
            camera["info"] = {
                "video.height": height, "video.width": width, "video.codec": "av1" if self.codec == "libsvtav1" else "h264",
                "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": self.fps, "video.channels": channels,
                "has_audio": False,
            }
        features = {self.camera: camera, "action": {"dtype": "float32", "shape": [action_dim], "names": [f"action_{i}" for i in range(action_dim)]}}
        return features | {name: {"dtype": dtype, "shape": [1], "names": None} for name, dtype in INDEX_FEATURES.items()}

    def _hf_features(self, action_dim: int) -> datasets.Features:
        features = {"action": datasets.List(datasets.Value("float32"), length=action_dim)}
        features |= {name: datasets.Value(dtype) for name, dtype in INDEX_FEATURES.items()}
        return datasets.Features(({self.camera: datasets.Image()} if self.image_storage == "image" else {}) | features)

    def _flush(self) -> None:
        if not self.buffer:
            return
        action_dim = len(self.buffer["action"][0])
        path = self.root / DATA_PATH.format(chunk_index=0, file_index=self.file_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(self.buffer, features=self._hf_features(action_dim)).to_parquet(str(path))
        if self.encoder is not None:
            self.encoder.close()
            self.encoder = None
        self.buffer = {}
        self.file_index += 1

    def finish(self, tasks: list[str], robot_type: str | None, actions: np.ndarray) -> None:
        self._flush()
        meta = self.root / "meta"
        (meta / "episodes" / "chunk-000").mkdir(parents=True)
        pd.DataFrame(self.episodes).to_parquet(self.root / EPISODES_PATH, index=False)
        pd.DataFrame({"task_index": range(len(tasks))}, index=pd.Index(tasks, name="task")).to_parquet(meta / "tasks.parquet")
        stats = {
            "action": _feature_stats(actions.astype(np.float64), True),
            self.camera: _image_stats(self.stat_frames),
        }
        for name, values in self.index_values.items():
            stats[name] = _feature_stats(np.asarray(values, dtype=np.float64)[:, None], False)
        (meta / "stats.json").write_text(json.dumps(stats, indent=4))
        info = {
            "codebase_version": "v3.0",
            "robot_type": robot_type,
            "total_episodes": len(self.episodes),
            "total_frames": self.total_frames,
            "total_tasks": len(tasks),
            "chunks_size": 1000,
            "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 200,
            "fps": self.fps,
            "splits": {"train": f"0:{len(self.episodes)}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.image_storage == "video" else None,
            "features": self._features(actions.shape[1]),
        }
        (meta / "info.json").write_text(json.dumps(info, indent=4))
