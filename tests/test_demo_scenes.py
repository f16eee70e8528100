"""The demo's scenes: training.demo_scenes writes exactly the shipped files, lisa_ros.demo reads them."""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from lisa_core.errors import InputError
from lisa_ros.demo import SCENES_FILE, load_scenes, scenes_dir
from training.data.phrasing import OFFICIAL
from training.demo_scenes import DEMO_FRAMES, DEPTH_MM, SCALE, demo_benchmark, write_scenes

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "demo" / "scenes"


def _index(folder: Path) -> list[dict]:
    return json.loads((folder / SCENES_FILE).read_text())["scenes"]


def test_writing_the_scenes_again_gives_the_shipped_files(tmp_path):
    shipped = _index(SHIPPED)
    write_scenes(tmp_path, count=len(shipped), seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in SHIPPED.iterdir())
    assert (tmp_path / SCENES_FILE).read_text() == (SHIPPED / SCENES_FILE).read_text()
    for path in sorted(SHIPPED.glob("*.png")):
        written = cv2.imread(str(tmp_path / path.name), cv2.IMREAD_UNCHANGED)
        expected = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert written.dtype == expected.dtype and np.array_equal(written, expected), path.name


def test_shipped_scenes_are_small_and_found_beside_the_demo_model():
    assert scenes_dir() == SHIPPED
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 300_000


def test_demo_reads_the_benchmark_scenes_with_their_ground_truth():
    scenes = load_scenes(SHIPPED)
    assert len(scenes) == len(_index(SHIPPED)) >= 4
    assert {scene.image.shape[:2] for scene in scenes} >= {(720, 1280), (720, 720)}
    for index, scene in enumerate(scenes):
        benchmark = demo_benchmark(index)
        assert benchmark.eval_phrasing != OFFICIAL and benchmark.aspect_ratios == (DEMO_FRAMES[index],)
        sample = benchmark.eval_sample(index)
        height, width = (side * SCALE for side in sample.image.shape[:2])
        assert scene.instruction == sample.conversations[0][0][0]
        assert scene.image.dtype == np.uint8 and scene.image.shape == (height, width, 3)
        # RGB as the benchmark drew it: every SCALE x SCALE block is one source pixel.
        assert np.array_equal(scene.image[::SCALE, ::SCALE], sample.image)
        assert np.array_equal(scene.truth[::SCALE, ::SCALE], sample.query_ground_truth(0) == 1)
        assert scene.truth.any()
        assert scene.depth.dtype == np.uint16 and np.all(scene.depth == DEPTH_MM)
        assert scene.k[2] == width / 2 and scene.k[5] == height / 2 and scene.k[8] == 1.0


@pytest.fixture
def copied_scenes(tmp_path):
    folder = tmp_path / "scenes"
    shutil.copytree(SHIPPED, folder)
    return folder


def test_a_missing_file_is_named(copied_scenes):
    (copied_scenes / "01_mask.png").unlink()
    with pytest.raises(InputError, match=r"01_mask\.png: missing or not a readable image"):
        load_scenes(copied_scenes)


def test_depth_that_is_not_16_bit_is_refused(copied_scenes):
    cv2.imwrite(str(copied_scenes / "00_depth.png"), np.full((720, 1280), 80, np.uint8))
    with pytest.raises(InputError, match=r"00_depth\.png: expected 1-channel uint16, got uint8"):
        load_scenes(copied_scenes)


def test_a_file_of_another_size_than_the_camera_is_refused(copied_scenes):
    cv2.imwrite(str(copied_scenes / "02.png"), np.zeros((100, 384, 3), np.uint8))
    with pytest.raises(InputError, match=r"02\.png: 384x100, but the camera is 960x720"):
        load_scenes(copied_scenes)


def test_a_broken_scene_list_is_named(copied_scenes):
    index = json.loads((copied_scenes / SCENES_FILE).read_text())
    del index["scenes"][1]["instruction"]
    (copied_scenes / SCENES_FILE).write_text(json.dumps(index))
    with pytest.raises(InputError, match=r"scene 1: a field is missing or malformed \(KeyError: 'instruction'\)"):
        load_scenes(copied_scenes)
    (copied_scenes / SCENES_FILE).write_text("{not json")
    with pytest.raises(InputError, match="not a readable scene list"):
        load_scenes(copied_scenes)
