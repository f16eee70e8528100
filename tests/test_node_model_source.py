"""Which model the node loads when model_path is empty, and the tiny preset written on first use."""

from pathlib import Path

import numpy as np

from lisa_core.pipeline import LisaPipeline
from lisa_ros import model_source
from lisa_ros.model_source import (TRAINED_DEMO_LABEL, UNTRAINED_TINY_LABEL, is_model_dir, resolve_model,
                                   write_tiny_preset)


def test_explicit_path_is_used_as_given(tmp_path):
    source = resolve_model(str(tmp_path / "my_model"), cache_dir=str(tmp_path / "cache"))
    assert source.path == tmp_path / "my_model" and not source.needs_writing
    assert source.label == f"model at {tmp_path / 'my_model'}"


def test_untrained_tiny_preset_is_written_once_into_the_cache_and_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(model_source, "demo_model_dirs", lambda: [tmp_path / "no_demo_here"])
    source = resolve_model("", cache_dir=str(tmp_path / "cache"))
    assert source.label == UNTRAINED_TINY_LABEL and "untrained" in source.label
    assert source.needs_writing and source.path.parent == tmp_path / "cache"
    write_tiny_preset(source.path)
    assert is_model_dir(source.path)
    assert [p.name for p in source.path.parent.iterdir()] == [source.path.name], "no staging left behind"
    again = resolve_model("", cache_dir=tmp_path / "cache")
    assert again.path == source.path and not again.needs_writing
    write_tiny_preset(source.path)  # a second writer (another process starting at once) is harmless
    result = LisaPipeline.from_pretrained(source.path).segment(np.zeros((32, 32, 3), np.uint8), "hello",
                                                               max_new_tokens=2)
    assert result.image_size == (32, 32)


def test_trained_demo_model_wins_when_present(tmp_path, monkeypatch):
    demo = tmp_path / "models" / "demo"
    demo.mkdir(parents=True)
    (demo / "lisa_config.json").write_text("{}")
    monkeypatch.setattr(model_source, "demo_model_dirs", lambda: [tmp_path / "absent", demo])
    source = resolve_model("", cache_dir=tmp_path / "cache")
    assert (source.path, source.label, source.needs_writing) == (demo, TRAINED_DEMO_LABEL, False)


def test_demo_model_is_looked_for_in_the_source_tree():
    assert Path(model_source.__file__).resolve().parents[1] / "models" / "demo" in model_source.demo_model_dirs()
