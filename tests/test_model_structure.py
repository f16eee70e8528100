"""LisaModel's module tree against the released checkpoints' key list, and the config presets."""

import json
from pathlib import Path

import pytest
import torch

from lisa_core.config import LisaConfig
from lisa_core.errors import ConfigurationError
from lisa_core.model import LisaModel, internal_to_official, official_to_internal

# Every parameter name and shape of the released checkpoints (derived from the official module code).
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "lisa_official_keys.json"


def official_keys():
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize(
    "release, config",
    [("LISA-7B-v1", LisaConfig.lisa_7b()), ("LISA-13B-llama2-v1", LisaConfig.lisa_13b())],
)
def test_module_tree_matches_released_checkpoint(release, config):
    expected = official_keys()["models"][release]
    with torch.device("meta"):
        model = LisaModel(config)
    ours = {name: list(tensor.shape) for name, tensor in model.official_state_dict().items()}
    assert sorted(set(expected) - set(ours)) == []  # nothing missing
    assert sorted(set(ours) - set(expected)) == []  # nothing unexpected
    wrong = {name: (ours[name], shape) for name, shape in expected.items() if ours[name] != shape}
    assert wrong == {}


def test_presets_match_the_released_vocabularies():
    tokens = official_keys()["special_tokens"]
    assert LisaConfig.lisa_7b().language_model.vocab_size == tokens["LISA-7B-v1"]["vocab_size"]
    assert LisaConfig.lisa_13b().language_model.vocab_size == tokens["LISA-13B-llama2-v1"]["vocab_size"]
    for config in (LisaConfig.lisa_7b(), LisaConfig.lisa_13b(), LisaConfig.tiny()):
        assert config.num_image_tokens == 256
        assert config.vision_select_layer == -2


def test_official_names_map_both_ways():
    with torch.device("meta"):
        model = LisaModel(LisaConfig.tiny())
    for name in model.state_dict():
        assert official_to_internal(internal_to_official(name)) == name
    assert official_to_internal("model.layers.0.self_attn.q_proj.weight") == (
        "language_model.model.layers.0.self_attn.q_proj.weight"
    )
    assert official_to_internal("lm_head.weight") == "language_model.lm_head.weight"
    assert official_to_internal("something.else") is None


def test_config_json_round_trip_and_unknown_field():
    for config in (LisaConfig.tiny(), LisaConfig.lisa_7b(), LisaConfig.lisa_13b()):
        assert LisaConfig.from_json(config.to_json()) == config
    data = LisaConfig.tiny().to_dict()
    data["sam"]["not_a_field"] = 1
    with pytest.raises(ConfigurationError, match="not_a_field"):
        LisaConfig.from_dict(data)


def test_tiny_stages_have_the_documented_shapes():
    torch.manual_seed(0)
    config = LisaConfig.tiny()
    model = LisaModel(config).eval()
    with torch.no_grad():
        features = model.encode_clip(torch.randn(1, 3, 224, 224))
        assert features.shape == (1, 256, config.language_model.hidden_size)
        size = config.sam.image_size
        embeddings = model.sam_image_embeddings(torch.randn(1, 3, size, size))
        side = config.sam.image_embedding_size
        assert embeddings.shape == (1, config.out_dim, side, side)
        prompts = model.project_seg(torch.randn(3, config.language_model.hidden_size))
        assert prompts.shape == (3, config.out_dim)
        low_res, iou = model.decode_masks(embeddings, prompts)
        assert low_res.shape == (3, 1, 4 * side, 4 * side)
        assert iou.shape == (3, 1)
        # each prompt is decoded on its own: the batch gives the same masks as one at a time
        single, _ = model.decode_masks(embeddings, prompts[1:2])
        torch.testing.assert_close(single[0], low_res[1], atol=1e-5, rtol=1e-5)


def test_embed_prompt_places_image_features_and_checks_their_count():
    from lisa_core.prompt import IMAGE_PLACEHOLDER_ID

    torch.manual_seed(0)
    model = LisaModel(LisaConfig.tiny()).eval()
    hidden = model.config.language_model.hidden_size
    features = torch.randn(1, 4, hidden)
    input_ids = torch.tensor([[1, 5, IMAGE_PLACEHOLDER_ID, IMAGE_PLACEHOLDER_ID, IMAGE_PLACEHOLDER_ID,
                               IMAGE_PLACEHOLDER_ID, 7]])
    with torch.no_grad():
        embeds = model.embed_prompt(input_ids, features)
        torch.testing.assert_close(embeds[0, 2:6], features[0])
        torch.testing.assert_close(embeds[0, 0], model.embed_tokens(torch.tensor(1)))
        with pytest.raises(ValueError, match="image placeholders"):
            model.embed_prompt(input_ids, torch.randn(1, 3, hidden))


@pytest.mark.parametrize(
    "release, config",
    [("LISA-7B-v1", LisaConfig.lisa_7b()), ("LISA-13B-llama2-v1", LisaConfig.lisa_13b())],
)
def test_every_released_key_loads_through_the_official_loader(release, config):
    """The loader's own name mapping and checks, fed every released key with meta tensors (no memory)."""
    from lisa_core.checkpoint import _empty_model, _StateLoader
    from lisa_core.errors import CheckpointError

    loader = _StateLoader(_empty_model(config), torch.device("meta"), torch.bfloat16, official_names=True)
    source = Path(release)
    for key, shape in official_keys()["models"][release].items():
        loader.load(official_to_internal(key), torch.empty(shape, device="meta"), source, key)
    loader.check_complete(source, skip_prefixes=("vision_tower.",))
    with pytest.raises(CheckpointError, match="missing key.*vision_tower"):
        loader.check_complete(source)  # CLIP comes from its own folder
    with pytest.raises(CheckpointError, match="shape"):
        loader.load("mm_projector.weight", torch.empty(3, 3, device="meta"), source, "model.mm_projector.weight")
