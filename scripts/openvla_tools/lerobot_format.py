"""Reading LeRobot datasets (layouts v3.0 and v2.1) as rows of (image, instruction, action) for fine-tuning.

A LeRobot dataset is a folder (or a Hub dataset repository) with `meta/info.json`, whose `codebase_version` names the
layout:

- v3.0: `meta/tasks.parquet`, `meta/episodes/chunk-*/file-*.parquet`, `meta/stats.json`, frames in
  `data/chunk-*/file-*.parquet` (many episodes per file) and camera videos in `videos/<key>/chunk-*/file-*.mp4`, where
  each episode occupies `[from_timestamp, to_timestamp)` of its file;
- v2.1: `meta/tasks.jsonl`, `meta/episodes.jsonl`, `meta/episodes_stats.jsonl`, one parquet per episode and one mp4
  per camera per episode, each starting at time 0.

The parquet files are read with `datasets`; video frames are decoded with PyAV (AV1 and H.264) at the frame's
`timestamp`, once: the decoded rows are written to the `datasets` cache, and a second read of the same files and
options loads them from there. Cameras stored as images inside the parquet (`dtype: image`) are read as they are.

The rows have the columns of the project's demonstrations: `image`, `instruction` (the frame's task), `action`,
`episode`, `step` (the frame index) and `dataset_name`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from .envs.tabletop import demonstration_features

logger = logging.getLogger(__name__)

SUPPORTED_VERSIONS = ("v3.0", "v2.1")
CAMERA_DTYPES = ("video", "image")
READER_VERSION = "1"
UPGRADE_HINT = (
    "convert it to v3.0 with LeRobot's converter (`python -m lerobot.datasets.v30.convert_dataset_v21_to_v30 "
    "--repo-id=<id>`, after LeRobot's own v2.0 -> v2.1 converter for older datasets)"
)


def parse_episodes(text: str | None) -> list[int] | None:
    """`"0-99,120"` -> `[0, 1, ..., 99, 120]`; None or `""` -> None (every episode)."""
    if not text:
        return None
    selected: set[int] = set()
    for item in (part.strip() for part in text.split(",")):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ValueError(f"--episodes item {item!r} is not an episode index or a range 'first-last'; write e.g. '0-99,120'.")
        selected.update(range(int(match[1]), int(match[2] or match[1]) + 1))
    return sorted(selected)


def _is_hub_repo_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith((".", "/"))


def resolve_lerobot_dataset(
    name: str, image_key: str | None = None, revision: str | None = None, cache_dir: str | Path | None = None
) -> Path | None:
    """The local folder of the LeRobot dataset `name`, or None when `name` is not one.

    `name` is a folder, or a Hub dataset repo id: its `meta/` files are downloaded with
    `huggingface_hub.snapshot_download` (None when they hold no `meta/info.json`), then its frames and the videos of
    camera `image_key` only (None: the only camera).

    Raises:
        ValueError: `name` is a folder with a `meta/` folder but no `meta/info.json`, or `image_key` is not a camera.
    """
    path = Path(name).expanduser()
    if path.exists():
        if (path / "meta" / "info.json").is_file():
            return path
        if (path / "meta").is_dir():
            raise ValueError(
                f"{str(path)!r} has a meta/ folder but no meta/info.json, so it is not a readable LeRobot dataset; "
                "copy the dataset's meta/info.json there (or download the dataset again)."
            )
        return None
    if not _is_hub_repo_id(name):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    def download(patterns: list[str]) -> Path:
        return Path(snapshot_download(name, repo_type="dataset", revision=revision, cache_dir=cache_dir, allow_patterns=patterns))

    try:
        folder = download(["meta/*"])
    except (RepositoryNotFoundError, LocalEntryNotFoundError):
        return None
    if not (folder / "meta" / "info.json").is_file():
        return None
    camera = LeRobotMetadata(folder).camera(image_key)
    return download(["meta/*", "data/*", f"videos/*{camera}/*"])


@dataclass
class EpisodeRecord:
    """Where one episode lives: its data file and, per video camera, its video file and start time in that file."""

    index: int
    length: int
    data_file: str
    videos: dict[str, tuple[str, float]] = field(default_factory=dict)


class LeRobotMetadata:
    """The metadata of a LeRobot dataset folder: `info`, `tasks` (task_index -> string) and `episodes`.

    Args:
        root: the dataset folder (with `meta/info.json`).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        info_path = self.root / "meta" / "info.json"
        if not info_path.is_file():
            raise ValueError(f"{str(self.root)!r} has no meta/info.json, so it is not a LeRobot dataset; point at the dataset's root folder.")
        self.info: dict[str, Any] = json.loads(info_path.read_text())
        self.version = self.info.get("codebase_version")
        if self.version not in SUPPORTED_VERSIONS:
            raise ValueError(
                f"{str(self.root)!r} is a LeRobot dataset of codebase_version {self.version!r}; this reader supports "
                f"{list(SUPPORTED_VERSIONS)}: {UPGRADE_HINT}."
            )
        self.fps = float(self.info["fps"])
        self.features: dict[str, dict] = self.info["features"]
        self.camera_keys = [key for key, spec in self.features.items() if spec.get("dtype") in CAMERA_DTYPES]
        if self.version == "v3.0":
            self.tasks, self.episodes = self._read_v30()
        else:
            self.tasks, self.episodes = self._read_v21()

    def _read_v30(self) -> tuple[dict[int, str], dict[int, EpisodeRecord]]:
        tasks_table = datasets.load_dataset("parquet", data_files=str(self.root / "meta" / "tasks.parquet"), split="train")
        name_column = "task" if "task" in tasks_table.column_names else "__index_level_0__"
        tasks = {int(i): str(t) for i, t in zip(tasks_table["task_index"], tasks_table[name_column])}
        files = sorted(str(p) for p in (self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise ValueError(f"{str(self.root)!r} has no meta/episodes/chunk-*/file-*.parquet; download the dataset's meta/ folder completely.")
        videos = [key for key in self.camera_keys if self.features[key]["dtype"] == "video"]
        columns = ["episode_index", "length", "data/chunk_index", "data/file_index"]
        columns += [f"videos/{key}/{name}" for key in videos for name in ("chunk_index", "file_index", "from_timestamp")]
        table = datasets.load_dataset("parquet", data_files=files, split="train", columns=columns)
        episodes = {}
        for row in table.to_pandas().to_dict("records"):
            data_file = self.info["data_path"].format(chunk_index=int(row["data/chunk_index"]), file_index=int(row["data/file_index"]))
            episode_videos = {
                key: (
                    self.info["video_path"].format(
                        video_key=key, chunk_index=int(row[f"videos/{key}/chunk_index"]), file_index=int(row[f"videos/{key}/file_index"])
                    ),
                    float(row[f"videos/{key}/from_timestamp"]),
                )
                for key in videos
            }
            index = int(row["episode_index"])
            episodes[index] = EpisodeRecord(index, int(row["length"]), data_file, episode_videos)
        return tasks, episodes

    def _read_v21(self) -> tuple[dict[int, str], dict[int, EpisodeRecord]]:
        tasks = {int(row["task_index"]): str(row["task"]) for row in self._jsonl("tasks.jsonl")}
        chunk_size = int(self.info.get("chunks_size", 1000))
        episodes = {}
        for row in self._jsonl("episodes.jsonl"):
            index = int(row["episode_index"])
            names = {"episode_chunk": index // chunk_size, "episode_index": index}
            videos = {
                key: (self.info["video_path"].format(video_key=key, **names), 0.0)
                for key in self.camera_keys
                if self.features[key]["dtype"] == "video"
            }
            episodes[index] = EpisodeRecord(index, int(row["length"]), self.info["data_path"].format(**names), videos)
        return tasks, episodes

    def _jsonl(self, name: str) -> list[dict]:
        path = self.root / "meta" / name
        if not path.is_file():
            raise ValueError(f"{str(self.root)!r} is a v2.1 LeRobot dataset without meta/{name}; download its meta/ folder completely.")
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def camera(self, image_key: str | None) -> str:
        """`image_key`, checked to be a camera of the dataset; None picks the only camera."""
        if image_key is None:
            if len(self.camera_keys) != 1:
                raise ValueError(f"{str(self.root)!r} has cameras {self.camera_keys}; pick one with --image_key.")
            return self.camera_keys[0]
        if image_key not in self.camera_keys:
            raise ValueError(f"Camera {image_key!r} is not in {str(self.root)!r}; its cameras are {self.camera_keys}. Set --image_key to one of them.")
        return image_key

    def action_dim(self, action_key: str) -> int:
        if action_key not in self.features:
            names = [key for key, spec in self.features.items() if spec.get("dtype") not in CAMERA_DTYPES]
            raise ValueError(f"Action key {action_key!r} is not a feature of {str(self.root)!r}; its features are {names}. Set --action_key.")
        return int(np.prod(self.features[action_key]["shape"]))

    def select(self, episodes: list[int] | None) -> list[EpisodeRecord]:
        """The records of `episodes` (all by default), checked to be in the dataset."""
        if episodes is None:
            return [self.episodes[index] for index in sorted(self.episodes)]
        missing = [index for index in episodes if index not in self.episodes]
        if missing:
            raise ValueError(
                f"Episodes {missing[:10]} are not in {str(self.root)!r}, whose episodes are {_ranges(sorted(self.episodes))}; "
                "pick --episodes among those."
            )
        return [self.episodes[index] for index in episodes]

    def lerobot_action_stats(self, action_key: str) -> dict[str, list[float]] | None:
        """The action entry of LeRobot's aggregated `meta/stats.json` (v3.0), if any."""
        path = self.root / "meta" / "stats.json"
        if not path.is_file():
            return None
        return json.loads(path.read_text()).get(action_key)


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, value in enumerate(values):
        start = value if start is None else start
        if i + 1 == len(values) or values[i + 1] != value + 1:
            parts.append(f"{start}" if start == value else f"{start}-{value}")
            start = None
    return ",".join(parts)


def read_frames(meta: LeRobotMetadata, records: list[EpisodeRecord], columns: list[str]) -> datasets.Dataset:
    """The parquet rows of `records`' episodes (columns `columns` only), read with `datasets`."""
    files = sorted({record.data_file for record in records})
    missing = [name for name in files if not (meta.root / name).is_file()]
    if missing:
        raise ValueError(f"{str(meta.root)!r} lacks the data file(s) {missing}; download the dataset's data/ folder completely.")
    try:
        table = datasets.load_dataset("parquet", data_files=[str(meta.root / name) for name in files], split="train", columns=columns)
    except datasets.exceptions.DatasetGenerationError as error:
        raise ValueError(
            f"The data files {files} of {str(meta.root)!r} cannot be read as one table ({error.__cause__ or error}); "
            "their columns must have the same types in every file: fix or re-export the dataset."
        ) from error
    wanted = np.array(sorted(record.index for record in records))
    keep = np.flatnonzero(np.isin(np.asarray(table["episode_index"]).reshape(-1), wanted))
    return table if len(keep) == len(table) else table.select(keep)


def check_actions(actions: Any, episodes: np.ndarray, frames: np.ndarray, action_dim: int, action_key: str) -> np.ndarray:
    """The actions as `[rows, action_dim]` float64, checked for length and NaN/inf (naming the episode and frame)."""
    for row, action in enumerate(actions):
        if len(np.atleast_1d(action)) != action_dim:
            raise ValueError(
                f"Episode {episodes[row]} frame {frames[row]}: {action_key!r} has {len(np.atleast_1d(action))} values where "
                f"meta/info.json declares {action_dim}; fix the data or pick another --action_key."
            )
    values = np.asarray([np.atleast_1d(action) for action in actions], dtype=np.float64).reshape(len(actions), action_dim)
    bad = np.argwhere(~np.isfinite(values))
    if len(bad):
        row = bad[0][0]
        raise ValueError(
            f"Episode {episodes[row]} frame {frames[row]}: {action_key!r} holds NaN or inf ({values[row].tolist()}); "
            "clean the data or leave the episode out with --episodes."
        )
    return values


def warn_if_lerobot_quantiles_disagree(lerobot_stats: dict | None, actions: np.ndarray, name: str, tolerance: float = 0.05) -> bool:
    """Compare LeRobot's stored q01/q99 with the actions' own 1% / 99% quantiles; log a warning when they differ by
    more than `tolerance` of the action range in any dimension. Returns whether they disagree.

    LeRobot v3 aggregates per-episode quantiles, which on small datasets can sit far inside the data's range; the
    statistics used for training are always computed from the actions themselves.
    """
    if not lerobot_stats or "q01" not in lerobot_stats or "q99" not in lerobot_stats:
        return False
    span = np.maximum(actions.max(axis=0) - actions.min(axis=0), 1e-8)
    worst = 0.0
    for stat, quantile in (("q01", 0.01), ("q99", 0.99)):
        stored = np.asarray(lerobot_stats[stat], dtype=np.float64).reshape(-1)
        if stored.shape[0] != actions.shape[1]:
            return False
        worst = max(worst, float(np.max(np.abs(stored - np.quantile(actions, quantile, axis=0)) / span)))
    if worst > tolerance:
        logger.warning(
            "%s: meta/stats.json's action q01/q99 differ from the actions' own 1%%/99%% quantiles by up to %.0f%% of "
            "the action range (LeRobot aggregates per-episode quantiles); training uses statistics computed from the "
            "training episodes' actions instead.",
            name,
            100 * worst,
        )
        return True
    return False


class VideoFrameDecoder:
    """Decodes the frames of one episode from an mp4 file at given timestamps with PyAV (AV1, H.264, ...).

    A frame matches a timestamp when it lies within half a frame interval of it, so every timestamp gets exactly
    its own frame or an error.
    """

    def __init__(self, fps: float):
        self.tolerance = 0.5 / fps

    def decode(self, path: Path, timestamps: np.ndarray, episode: int) -> list[np.ndarray]:
        """`timestamps` `[frames]` in seconds of the file -> the RGB frames `[height, width, 3]` uint8 at them."""
        import av

        try:
            container = av.open(str(path))
        except (FileNotFoundError, av.error.FFmpegError) as error:
            raise ValueError(
                f"Episode {episode}: cannot open the video {str(path)!r} ({error}); download the dataset's videos/ folder "
                "again (or install the decoder extra: pip install 'openvla-hf[video]')."
            ) from error
        with container:
            stream = container.streams.video[0]
            start, end = float(timestamps.min()), float(timestamps.max())
            times, frames = [], []
            try:
                container.seek(max(0, int((start - self.tolerance) / stream.time_base)), stream=stream, backward=True)
                for frame in container.decode(stream):
                    if frame.time is None or frame.time < start - self.tolerance:
                        continue
                    if frame.time > end + self.tolerance:
                        break
                    times.append(frame.time)
                    frames.append(frame.to_ndarray(format="rgb24"))
            except av.error.FFmpegError as error:
                raise ValueError(f"Episode {episode}: the video {str(path)!r} cannot be decoded ({error}); download it again.") from error
        times = np.asarray(times, dtype=np.float64)
        result = []
        for timestamp in timestamps:
            nearest = int(np.argmin(np.abs(times - timestamp))) if len(times) else -1
            if nearest < 0 or abs(times[nearest] - timestamp) > self.tolerance:
                raise ValueError(
                    f"Episode {episode}: the video {str(path)!r} has no frame at {timestamp:.3f} s (it has {len(times)} "
                    f"frames between {start:.3f} s and {end:.3f} s): the video is shorter than the episode's frames. "
                    "Re-encode the episode's video or leave the episode out with --episodes."
                )
            result.append(frames[nearest])
        return result


def _source_fingerprint(meta: LeRobotMetadata, records: list[EpisodeRecord], options: dict[str, Any]) -> str:
    """A hash of the files the rows come from (path, size, mtime) and the options, naming the rows' cache entry."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    digest.update(str(meta.root.resolve()).encode())
    names = {record.data_file for record in records} | {file for record in records for file, _ in record.videos.values()}
    for name in sorted(names) + ["meta/info.json"]:
        path = meta.root / name
        stat = path.stat() if path.exists() else None
        digest.update(f"{name}:{stat.st_size if stat else -1}:{stat.st_mtime_ns if stat else -1}".encode())
    return digest.hexdigest()[:32]


def _generate_rows(root: str, image_key: str, action_key: str, episodes: tuple[int, ...], dataset_name: str):
    """Yields the rows of `episodes`, decoding each episode's video once (the `datasets.Dataset.from_generator` body;
    `episodes` is a tuple, as `datasets` would split a list into shards)."""
    meta = LeRobotMetadata(root)
    records = meta.select(list(episodes))
    is_video = meta.features[image_key]["dtype"] == "video"
    table = read_frames(meta, records, ["episode_index", "frame_index", "timestamp", "task_index", action_key] + ([] if is_video else [image_key]))
    columns = {name: np.asarray(table[name]).reshape(-1) for name in ("episode_index", "frame_index", "timestamp", "task_index")}
    actions = check_actions(table[action_key], columns["episode_index"], columns["frame_index"], meta.action_dim(action_key), action_key)
    stored = None if is_video else table.cast_column(image_key, datasets.Image(decode=False))[image_key]
    decoder = VideoFrameDecoder(meta.fps)
    for record in records:
        rows = np.flatnonzero(columns["episode_index"] == record.index)
        if len(rows) == 0:
            raise ValueError(f"Episode {record.index} has no frames in {record.data_file!r}; the dataset is incomplete, download it again.")
        if is_video:
            video_file, offset = record.videos[image_key]
            timestamps = offset + columns["timestamp"][rows].astype(np.float64)
            images = decoder.decode(meta.root / video_file, timestamps, record.index)
        else:
            images = [stored[row] for row in rows]
        for image, row in zip(images, rows):
            yield {
                "image": image,
                "instruction": meta.tasks[int(columns["task_index"][row])],
                "action": actions[row].astype(np.float32),
                "episode": record.index,
                "step": int(columns["frame_index"][row]),
                "dataset_name": dataset_name,
            }


def load_lerobot_dataset(
    root: str | Path,
    image_key: str | None = None,
    action_key: str = "action",
    episodes: list[int] | None = None,
    dataset_name: str | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """The rows of a LeRobot dataset folder as a `datasets.Dataset` of (image, instruction, action, episode, step,
    dataset_name), decoded once and then loaded from the `datasets` cache.

    Args:
        root: the folder (see `resolve_lerobot_dataset` for Hub ids).
        image_key: camera feature, e.g. `observation.images.top`; None picks the only camera.
        action_key: the action feature.
        episodes: episode indices (all by default).
        dataset_name: the `dataset_name` column (the `unnorm_key`); the folder's name by default.
        cache_dir: the `datasets` cache folder (its default location by default).

    Raises:
        ValueError: on any of the bad inputs the messages name; nothing is left in the cache then.
    """
    meta = LeRobotMetadata(root)
    image_key = meta.camera(image_key)
    action_dim = meta.action_dim(action_key)
    records = meta.select(episodes)
    for record in records:
        if image_key in record.videos and not (meta.root / record.videos[image_key][0]).is_file():
            raise ValueError(
                f"Episode {record.index}: the video {record.videos[image_key][0]!r} of camera {image_key!r} is missing from "
                f"{str(meta.root)!r}; download the dataset's videos/ folder completely."
            )
    name = dataset_name or meta.root.resolve().name
    actions_table = read_frames(meta, records, ["episode_index", "frame_index", action_key])
    actions = check_actions(
        actions_table[action_key],
        np.asarray(actions_table["episode_index"]).reshape(-1),
        np.asarray(actions_table["frame_index"]).reshape(-1),
        action_dim,
        action_key,
    )
    if episodes is None:
        warn_if_lerobot_quantiles_disagree(meta.lerobot_action_stats(action_key), actions, name)
    options = {"image_key": image_key, "action_key": action_key, "episodes": [r.index for r in records], "name": name}
    try:
        return datasets.Dataset.from_generator(
            _generate_rows,
            features=demonstration_features(action_dim),
            cache_dir=cache_dir,
            gen_kwargs={"root": str(meta.root), "image_key": image_key, "action_key": action_key, "episodes": tuple(options["episodes"]), "dataset_name": name},
            fingerprint=_source_fingerprint(meta, records, {**options, "reader": READER_VERSION}),
        )
    except datasets.exceptions.DatasetGenerationError as error:
        if isinstance(error.__cause__, ValueError):
            raise error.__cause__ from None
        raise
