"""Checkpoints: the official LISA layout (written by us at tiny size) and our own format."""

import importlib.util
import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lisa_core.checkpoint import from_pretrained, save_official_layout, save_pretrained, strip_around_tokens
from lisa_core.errors import CheckpointError, ConfigurationError
from lisa_core.pipeline import LisaPipeline
from lisa_core.preprocess import clip_preprocess
from lisa_core.tiny import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model whose tokenizer already strips whitespace around LISA's tokens, as official ones do."""
    path = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=3)
    model, tokenizer = from_pretrained(path)
    strip_around_tokens(tokenizer)
    save_pretrained(model, tokenizer, path)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def official(tiny, tmp_path_factory):
    _, model, tokenizer = tiny
    root = tmp_path_factory.mktemp("official")
    save_official_layout(model, tokenizer, root / "LISA-tiny", vision_tower_dir=root / "clip", shard_size=300_000)
    return root / "LISA-tiny", root / "clip"


def forced_seg_processor(seg_id):
    def processor(generated_ids, logits):
        if len(generated_ids) in (1, 3):
            logits = logits.clone()
            logits[seg_id] += 1e4
        return logits

    return processor


def test_official_layout_files(official, tiny):
    folder, clip = official
    names = {path.name for path in folder.iterdir()}
    shards = sorted(name for name in names if name.startswith("pytorch_model-"))
    assert len(shards) > 1 and "pytorch_model.bin.index.json" in names and "config.json" in names
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    keys = set(index["weight_map"])
    assert "model.visual_model.mask_decoder.iou_token.weight" in keys
    assert "model.text_hidden_fcs.0.2.weight" in keys and "lm_head.weight" in keys
    assert not any("vision_tower" in key for key in keys)  # CLIP lives in its own folder
    assert (clip / "config.json").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llava" and config["vision_tower"] == str(clip.resolve())


def test_official_layout_loads_with_the_same_outputs(official, tiny):
    folder, _ = official
    _, model, tokenizer = tiny
    loaded, loaded_tokenizer = from_pretrained(folder)
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert set(original_state) == set(loaded_state)
    for name, tensor in original_state.items():
        assert torch.equal(tensor, loaded_state[name]), name
    seg = loaded_tokenizer.convert_tokens_to_ids("[SEG]")
    assert seg == tokenizer.convert_tokens_to_ids("[SEG]")
    image = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    results = [
        LisaPipeline(m, t, logits_processor=forced_seg_processor(seg)).segment(image, "Segment the cup.",
                                                                                max_new_tokens=6)
        for m, t in ((model, tokenizer), (loaded, loaded_tokenizer))
    ]
    assert results[0].output_ids == results[1].output_ids
    assert len(results[0].targets) == 2
    for a, b in zip(results[0].targets, results[1].targets):
        assert np.array_equal(a.mask, b.mask)
        torch.testing.assert_close(a.prompt_embedding, b.prompt_embedding, atol=1e-6, rtol=0)


def test_official_tokenizer_drops_whitespace_around_lisa_tokens(official, tmp_path):
    """As transformers 4.31's slow Llama tokenizer did for tokens added with add_tokens."""
    _, tokenizer = from_pretrained(official[0])
    spaced = tokenizer("USER: <im_start> <im_end>\nCan you segment it? ASSISTANT: Sure, [SEG] .").input_ids
    tight = tokenizer("USER:<im_start><im_end>Can you segment it? ASSISTANT: Sure,[SEG].").input_ids
    assert spaced == tight
    assert tokenizer("a </s> b").input_ids != tokenizer("a</s>b").input_ids  # other special tokens keep it


def test_official_safetensors_shards_load(tiny, tmp_path):
    _, model, tokenizer = tiny
    folder = tmp_path / "st"
    save_official_layout(model, tokenizer, folder, vision_tower_dir=tmp_path / "clip")
    state = torch.load(folder / "pytorch_model-00001-of-00001.bin", weights_only=True)
    (folder / "pytorch_model-00001-of-00001.bin").unlink()
    (folder / "pytorch_model.bin.index.json").unlink()
    keys = sorted(state)
    half = len(keys) // 2
    weight_map = {}
    for index, part in enumerate((keys[:half], keys[half:]), start=1):
        name = f"model-{index:05d}-of-00002.safetensors"
        save_file({key: state[key].contiguous() for key in part}, str(folder / name))
        weight_map.update({key: name for key in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded, _ = from_pretrained(folder)
    assert torch.equal(loaded.language_model.lm_head.weight, model.language_model.lm_head.weight)


def test_our_format_round_trip_and_dtype(tiny, tmp_path):
    _, model, tokenizer = tiny
    save_pretrained(model, tokenizer, tmp_path / "again")
    loaded, loaded_tokenizer = from_pretrained(tmp_path / "again")
    assert loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert loaded_tokenizer("Sure, it is [SEG].").input_ids == tokenizer("Sure, it is [SEG].").input_ids
    half, _ = from_pretrained(tmp_path / "again", dtype="bf16")
    assert half.language_model.lm_head.weight.dtype == torch.bfloat16
    assert half.visual_model.mask_decoder.iou_token.weight.dtype == torch.bfloat16
    # SAM's positional-encoding matrix is a buffer that keeps float32 (its input grid is float32)
    assert half.visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32


class _CreatesFile:
    """Unpickling this would create a file: a stand-in for code hidden in a checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused(official, tmp_path):
    folder, clip = official
    bad = tmp_path / "bad"
    bad.mkdir()
    for source in folder.iterdir():
        (bad / source.name).write_bytes(source.read_bytes())
    victim = tmp_path / "pwned.txt"
    shard = sorted(bad.glob("pytorch_model-*.bin"))[0]
    state = torch.load(shard, weights_only=True)
    state["payload"] = _CreatesFile(str(victim))
    torch.save(state, shard)
    assert not victim.exists()
    with pytest.raises(CheckpointError, match=shard.name):
        from_pretrained(bad)
    assert not victim.exists()
    # the same payload in a plain pickle .bin (no zip container)
    with open(shard, "wb") as handle:
        pickle.dump({"x": _CreatesFile(str(victim))}, handle, protocol=2)
    with pytest.raises(CheckpointError, match=shard.name):
        from_pretrained(bad)
    assert not victim.exists()


def _copy(folder, target):
    target.mkdir()
    for source in folder.iterdir():
        (target / source.name).write_bytes(source.read_bytes())
    return target


def _edit_first_shard(folder, edit):
    shard = sorted(folder.glob("pytorch_model-*.bin"))[0]
    state = torch.load(shard, weights_only=True)
    edit(state)
    torch.save(state, shard)
    return shard


def test_missing_shard_is_named(official, tmp_path):
    bad = _copy(official[0], tmp_path / "bad")
    shard = sorted(bad.glob("pytorch_model-*.bin"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*missing"):
        from_pretrained(bad)


def test_missing_key_is_named(official, tmp_path):
    bad = _copy(official[0], tmp_path / "bad")
    removed = []
    _edit_first_shard(bad, lambda state: removed.append(state.pop(sorted(state)[0])))
    index = json.loads((bad / "pytorch_model.bin.index.json").read_text())
    first_shard = sorted(bad.glob("pytorch_model-*.bin"))[0].name
    missing_key = sorted(key for key, file in index["weight_map"].items() if file == first_shard)[0]
    with pytest.raises(CheckpointError, match=f"missing key.*{missing_key}"):
        from_pretrained(bad)


def test_unexpected_key_is_named(official, tmp_path):
    bad = _copy(official[0], tmp_path / "bad")
    shard = _edit_first_shard(bad, lambda state: state.update({"model.extra_head.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=f"{shard.name}.*unexpected key 'model.extra_head.weight'"):
        from_pretrained(bad)


def test_wrong_shape_is_named(official, tmp_path):
    bad = _copy(official[0], tmp_path / "bad")
    holder = {}

    def shrink(state):
        key = sorted(state)[0]
        holder["key"] = key
        state[key] = state[key].reshape(-1)[:1].clone()

    shard = _edit_first_shard(bad, shrink)
    with pytest.raises(CheckpointError, match=f"{shard.name}.*{holder['key']}.*shape"):
        from_pretrained(bad)


def test_wrong_model_type_and_missing_files(official, tmp_path):
    bad = _copy(official[0], tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "bert"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json.*'bert'"):
        from_pretrained(bad)
    with pytest.raises(CheckpointError, match="not found"):
        from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="lisa_config.json"):
        from_pretrained(empty)


def test_missing_vision_tower_is_explained(official, tmp_path):
    bad = _copy(official[0], tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["vision_tower"] = config["mm_vision_tower"] = "openai/clip-vit-large-patch14"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="clip-vit-large-patch14.*local Hugging Face cache"):
        from_pretrained(bad)
    loaded, _ = from_pretrained(bad, vision_tower=official[1])  # the folder given explicitly
    assert loaded.vision_tower.config.hidden_size == 32


def test_tokenizer_without_seg_is_refused(tiny, tmp_path):
    bad = _copy(tiny[0], tmp_path / "bad")
    tokenizer_state = json.loads((bad / "tokenizer.json").read_text())
    tokenizer_state["added_tokens"] = [t for t in tokenizer_state["added_tokens"] if t["content"] != "[SEG]"]
    (bad / "tokenizer.json").write_text(json.dumps(tokenizer_state))
    tokenizer_config = json.loads((bad / "tokenizer_config.json").read_text())
    tokenizer_config["added_tokens_decoder"] = {
        key: value for key, value in tokenizer_config.get("added_tokens_decoder", {}).items()
        if value["content"] != "[SEG]"
    }
    (bad / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(CheckpointError, match=r"no \[SEG\] token"):
        from_pretrained(bad)


def test_our_format_errors_name_file_and_key(tiny, tmp_path):
    from safetensors.torch import load_file

    bad = _copy(tiny[0], tmp_path / "bad")
    weights = load_file(str(bad / "model.safetensors"))
    weights.pop("text_hidden_fcs.0.2.bias")
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.safetensors.*missing key.*'text_hidden_fcs.0.2.bias'"):
        from_pretrained(bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors.*not a readable safetensors"):
        from_pretrained(bad)


def test_loaded_weights_are_trainable_parameters(tiny):
    """Training builds on from_pretrained: nothing comes back frozen or as a plain tensor."""
    _, model, _ = tiny
    parameters = dict(model.named_parameters())
    assert "visual_model.mask_decoder.iou_token.weight" in parameters
    assert all(p.requires_grad for p in parameters.values())


def write_llama_tokenizer_files(folder, vocab_size=500):
    """Tokenizer files as LISA released them (transformers 4.31): a SentencePiece model trained here
    with Llama's settings, added_tokens.json, and a tokenizer_config.json with no "legacy" entry."""
    import io

    import sentencepiece as spm

    from lisa_core.tiny import BASE_CORPUS

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(BASE_CORPUS) * 20), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        normalization_rule_name="identity", split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 512,
        "clean_up_tokenization_spaces": False}))
    added = ["<im_patch>", "<im_start>", "<im_end>", "[SEG]"]
    (folder / "added_tokens.json").write_text(json.dumps({t: vocab_size + i for i, t in enumerate(added)}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}))
    return spm.SentencePieceProcessor(model_proto=model.getvalue()), {t: vocab_size + i for i, t in enumerate(added)}


def slow_llama_ids(sentencepiece, added, text):
    """What transformers 4.31's slow legacy LlamaTokenizer gave for `text` (no </s> inside): BOS, then
    each piece between added tokens stripped of surrounding whitespace and SentencePiece-encoded."""
    import re

    pieces = re.split("(" + "|".join(re.escape(token) for token in added) + ")", text)
    ids = [1]
    for index, piece in enumerate(pieces):
        if piece in added:
            ids.append(added[piece])
            continue
        piece = piece.lstrip() if index > 0 else piece
        piece = piece.rstrip() if index < len(pieces) - 1 else piece
        if piece:
            ids.extend(sentencepiece.encode(piece))
    return ids


@pytest.mark.skipif(importlib.util.find_spec("google.protobuf") is None, reason="needs protobuf")
def test_released_style_tokenizer_gives_the_ids_lisa_was_trained_on(tmp_path):
    from transformers import AutoTokenizer

    from lisa_core.prompt import build_prompt, tokenize_with_image
    from lisa_core.tiny import build_tiny_model

    spm_dir = tmp_path / "spm"
    spm_dir.mkdir()
    sentencepiece, added = write_llama_tokenizer_files(spm_dir)
    plain = AutoTokenizer.from_pretrained(spm_dir)
    folder = tmp_path / "LISA"
    save_official_layout(build_tiny_model(plain), plain, folder, vision_tower_dir=tmp_path / "clip")
    for written in folder.iterdir():
        if "token" in written.name:
            written.unlink()
    for name in ("tokenizer.model", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        (folder / name).write_bytes((spm_dir / name).read_bytes())

    model, tokenizer = from_pretrained(folder)
    assert tokenizer.convert_tokens_to_ids("[SEG]") == added["[SEG]"]
    for query in ("Can you segment the cup in this image?", "What is 3 + 4?  Please output segmentation mask."):
        prompt = build_prompt(query)
        before, after = prompt.split("<image>")
        expected = (slow_llama_ids(sentencepiece, added, before) + [-200] * 256
                    + slow_llama_ids(sentencepiece, added, after)[1:])
        assert tokenize_with_image(tokenizer, prompt, 256) == expected
    answer = "Sure, it is [SEG] ."
    assert tokenizer(answer).input_ids == slow_llama_ids(sentencepiece, added, answer)
    result = LisaPipeline(model, tokenizer, max_new_tokens=3).segment(
        np.zeros((16, 16, 3), dtype=np.uint8), "Can you segment the cup?")
    assert len(result.output_ids) == 3


def wide_frame():
    image = np.full((36, 64, 3), 90, dtype=np.uint8)
    image[:, :6] = (255, 0, 0)
    return image


def clip_inputs(model, tokenizer, monkeypatch):
    """The CLIP pixels a pipeline built on `model` feeds the vision tower for wide_frame()."""
    seen = []
    encode_clip = model.encode_clip
    monkeypatch.setattr(model, "encode_clip", lambda pixels: seen.append(pixels[0].clone()) or encode_clip(pixels))
    LisaPipeline(model, tokenizer, max_new_tokens=2).segment(wide_frame(), "Segment the cup.")
    return seen[0]


def test_clip_framing_round_trip_and_overrides(tiny, tmp_path, monkeypatch):
    path, _, _ = tiny
    model, tokenizer = from_pretrained(path)
    assert model.config.clip_framing == "crop"
    model.config.clip_framing = "pad"
    save_pretrained(model, tokenizer, tmp_path / "pad")
    assert json.loads((tmp_path / "pad" / "lisa_config.json").read_text())["clip_framing"] == "pad"
    loaded, loaded_tokenizer = from_pretrained(tmp_path / "pad")
    assert loaded.config.clip_framing == "pad"
    assert torch.equal(clip_inputs(loaded, loaded_tokenizer, monkeypatch), clip_preprocess(wide_frame(), framing="pad"))
    assert LisaPipeline.from_pretrained(tmp_path / "pad").config.clip_framing == "pad"
    overridden = LisaPipeline.from_pretrained(tmp_path / "pad", clip_framing="crop")
    assert overridden.config.clip_framing == "crop"
    assert torch.equal(clip_inputs(overridden.model, overridden.tokenizer, monkeypatch), clip_preprocess(wide_frame()))
    with pytest.raises(ConfigurationError, match=r"clip_framing must be one of \('crop', 'pad'\), got 'square'"):
        LisaPipeline.from_pretrained(tmp_path / "pad", clip_framing="square")


def test_config_files_without_or_with_a_bad_framing(tiny, tmp_path):
    path, model, tokenizer = tiny
    save_pretrained(model, tokenizer, tmp_path / "old")
    config_path = tmp_path / "old" / "lisa_config.json"
    config = json.loads(config_path.read_text())
    del config["clip_framing"]  # written before the setting existed
    config_path.write_text(json.dumps(config))
    assert from_pretrained(tmp_path / "old")[0].config.clip_framing == "crop"
    config_path.write_text(json.dumps({**config, "clip_framing": "stretch"}))
    with pytest.raises(ConfigurationError, match="clip_framing must be one of"):
        from_pretrained(tmp_path / "old")


def test_official_folders_load_as_crop(official, tiny, tmp_path):
    padded, padded_tokenizer = from_pretrained(tiny[0])
    padded.config.clip_framing = "pad"
    folder = save_official_layout(padded, padded_tokenizer, tmp_path / "LISA-pad", vision_tower_dir=tmp_path / "clip")
    assert "clip_framing" not in json.loads((folder / "config.json").read_text())
    assert from_pretrained(folder)[0].config.clip_framing == "crop"
    assert from_pretrained(official[0])[0].config.clip_framing == "crop"
    assert LisaPipeline.from_pretrained(official[0], clip_framing="pad").config.clip_framing == "pad"
