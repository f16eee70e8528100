"""training.collate and training.model: token layout, labels, masks, the trainable set and the forward."""

import numpy as np
import pytest
import torch

from lisa_core.errors import InputError
from lisa_core.prompt import IMAGE_PLACEHOLDER_ID
from lisa_core.pipeline import LisaPipeline
from lisa_core.prompt import SYSTEM_PROMPT, Turn, build_prompt, tokenize_with_image
from lisa_core.tiny import build_tiny_model, build_tiny_tokenizer
from training.collate import IGNORE_INDEX, LisaCollator
from training.config import TrainConfig
from training.data import Sample, corpus
from training.losses import LossWeights
from training.model import (
    LisaForTraining,
    lora_module_names,
    merge_lora,
    prepare_for_finetuning,
    trainable_parameter_names,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(corpus())


@pytest.fixture()
def model(tokenizer):
    return build_tiny_model(tokenizer, seed=0)


def _image(height=40, width=60, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _mask(height, width, rows, cols):
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[rows, cols] = 1
    return mask


def _two_samples():
    first = Sample(
        _image(40, 60, 0),
        [
            [("Find both triangles.", "Sure, [SEG] and [SEG].")],
            [("Which shape would roll?", "There is no such object in the image.")],
        ],
        [_mask(40, 60, slice(0, 10), slice(0, 10)), _mask(40, 60, slice(20, 30), slice(5, 9))],
        "synthetic",
    )
    mask = _mask(50, 30, slice(3, 9), slice(2, 20))
    mask[0, 0] = 255  # ignored label: background for the loss
    second = Sample(_image(50, 30, 1), [[("red shape", "It is [SEG].")]], [mask], "reason_seg")
    return first, second


def test_tiny_tokenizer_spells_the_conversation_frame_in_whole_words(tokenizer):
    # Every training row starts with the frame; spelled in pieces it was most of a row's text tokens.
    frame_tokens = tokenizer(SYSTEM_PROMPT, add_special_tokens=False).input_ids
    assert len(frame_tokens) <= len(SYSTEM_PROMPT.split())


def test_conversation_tokens_match_inference_prompt_and_labels_cover_answers_only(tokenizer, model):
    collator = LisaCollator(tokenizer, model.config, max_length=512)
    question, answer = "Which shape would roll?", "Sure, [SEG]. The red circle would roll because it is round."
    ids, labels, kept = collator.encode_conversation([(question, answer)])
    prompt_ids = tokenize_with_image(tokenizer, build_prompt(question), model.config.num_image_tokens)
    assert kept == 1
    assert ids[: len(prompt_ids)] == prompt_ids  # exactly what lisa_core feeds at inference
    assert ids.count(IMAGE_PLACEHOLDER_ID) == model.config.num_image_tokens
    assert all(label == IGNORE_INDEX for label in labels[: len(prompt_ids)])
    answer_labels = labels[len(prompt_ids):]
    assert answer_labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer_labels[:-1]) == answer


def test_multi_turn_conversation_labels_each_answer(tokenizer, model):
    collator = LisaCollator(tokenizer, model.config, max_length=512)
    turns = [("Find both triangles.", "Sure, [SEG] and [SEG]."), ("Which shape would roll?", "It is [SEG].")]
    ids, labels, kept = collator.encode_conversation(turns)
    assert kept == 2
    labelled = [token for token in labels if token != IGNORE_INDEX]
    expected = (
        tokenizer("Sure, [SEG] and [SEG].", add_special_tokens=False).input_ids
        + [tokenizer.eos_token_id]
        + tokenizer("It is [SEG].", add_special_tokens=False).input_ids
        + [tokenizer.eos_token_id]
    )
    assert labelled == expected
    # Up to the second answer, the ids are what lisa_core feeds for the follow-up query with history.
    follow_up = tokenize_with_image(
        tokenizer, build_prompt(turns[1][0], [Turn(*turns[0])]), model.config.num_image_tokens
    )
    assert ids[: len(follow_up)] == follow_up
    assert labels[len(follow_up) - 1] == IGNORE_INDEX and labels[len(follow_up)] != IGNORE_INDEX


def test_batch_of_samples_with_several_segs(tokenizer, model):
    collator = LisaCollator(tokenizer, model.config, max_length=512)
    batch = collator(list(_two_samples()))
    assert batch.input_ids.shape[0] == 3  # three conversations
    assert batch.conversation_image.tolist() == [0, 0, 1]
    seg_id = collator.seg_token_id
    assert (batch.input_ids == seg_id).sum(dim=1).tolist() == [2, 0, 1]
    assert [tuple(m.shape) for m in batch.gt_masks] == [(2, 40, 60), (1, 50, 30)]
    assert batch.gt_masks[1][0, 0, 0].item() == 0.0  # 255 -> background
    assert batch.gt_masks[1].sum().item() == 6 * 18
    assert batch.original_sizes == [(40, 60), (50, 30)]
    size = model.config.sam.image_size
    assert batch.resized_sizes == [(round(40 * size / 60), size), (size, round(30 * size / 50))]
    assert batch.sam_pixels.shape == (2, 3, size, size)
    clip = model.config.vision_tower.image_size
    assert batch.clip_pixels.shape == (2, 3, clip, clip)
    # right padding: the attention mask counts each row's real tokens, padding labels are ignored
    lengths = batch.attention_mask.sum(dim=1)
    for row, length in enumerate(lengths.tolist()):
        assert (batch.labels[row, length:] == IGNORE_INDEX).all()


def test_too_long_conversations_drop_trailing_turns_and_their_masks(tokenizer, model):
    first_turn = ("Find both triangles.", "Sure, [SEG] and [SEG].")
    collator = LisaCollator(tokenizer, model.config, max_length=512)
    one_turn_length = len(collator.encode_conversation([first_turn])[0])
    short = LisaCollator(tokenizer, model.config, max_length=one_turn_length + 3)
    sample = Sample(
        _image(), [[first_turn, ("Which shape would roll?", "It is [SEG].")]],
        [_mask(40, 60, 0, 0), _mask(40, 60, 1, 1), _mask(40, 60, 2, 2)], "vqa",
    )
    batch = short([sample])
    assert batch.input_ids.shape[1] == one_turn_length
    assert batch.gt_masks[0].shape[0] == 2
    with pytest.raises(InputError, match="max_length"):
        LisaCollator(tokenizer, model.config, max_length=20)([sample])


def test_lora_wraps_only_the_language_models_q_and_v(model):
    prepare_for_finetuning(model, TrainConfig())
    wrapped = lora_module_names(model)
    layers = model.config.language_model.num_hidden_layers
    assert len(wrapped) == 2 * layers
    assert all(name.startswith("language_model.model.layers.") for name in wrapped)
    assert {name.rsplit(".", 1)[1] for name in wrapped} == {"q_proj", "v_proj"}
    trainable = trainable_parameter_names(model)
    for fragment in ("lm_head", "embed_tokens", "mask_decoder", "text_hidden_fcs", "lora_A", "lora_B"):
        assert any(fragment in name for name in trainable), fragment
    for frozen in ("vision_tower.", "mm_projector.", "visual_model.image_encoder.", "visual_model.prompt_encoder."):
        assert not any(name.startswith(frozen) for name in trainable), frozen
    assert not any(
        name.startswith("language_model.model.layers.") and "lora_" not in name for name in trainable
    )


def test_full_finetuning_trains_everything_but_what_is_named(model):
    config = TrainConfig(finetune="full", frozen_modules_full=["vision_tower."])
    prepare_for_finetuning(model, config)
    trainable = set(trainable_parameter_names(model))
    everything = {name for name, _ in model.named_parameters()}
    assert trainable == {name for name in everything if not name.startswith("vision_tower.")}
    assert not lora_module_names(model)


def test_merged_lora_gives_the_same_outputs(tokenizer, model):
    prepare_for_finetuning(model, TrainConfig(lora_dropout=0.0))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # B starts at zero: make the adapters matter
    collator = LisaCollator(tokenizer, model.config, max_length=512)
    batch = collator(list(_two_samples()))
    module = LisaForTraining(model.eval(), tokenizer)
    with torch.no_grad():
        before = module(batch)
        merge_lora(model)
        after = module(batch)
    assert not lora_module_names(model)
    for key in before:
        assert after[key].item() == pytest.approx(before[key].item(), rel=1e-4, abs=1e-5)


def test_teacher_forced_seg_embedding_is_the_one_inference_uses(tokenizer, model):
    """The training forward reads [SEG] at the position that predicts it, exactly as generation does."""
    image = _image(48, 64, 3)
    question = "Which shape would roll?"
    answer_ids = tokenizer("Sure, [SEG].", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]

    def force_answer(generated, logits):
        forced = torch.full_like(logits, -1e9)
        forced[answer_ids[len(generated)]] = 0.0
        return forced

    pipeline = LisaPipeline(model, tokenizer, logits_processor=force_answer)
    result = pipeline.segment(image, question)
    assert len(result.targets) == 1
    sample = Sample(image, [[(question, "Sure, [SEG].")]], [np.zeros((48, 64), np.uint8)], "synthetic")
    batch = LisaCollator(tokenizer, model.config, max_length=512)([sample])
    module = LisaForTraining(model, tokenizer)
    with torch.no_grad():
        hidden, _ = module.language_outputs(batch)
        seg_hidden, per_row = module.seg_states(batch.input_ids, hidden)
        prompt = model.project_seg(seg_hidden)
        logits = module.predict_masks(batch)[0]
    assert per_row.tolist() == [1]
    torch.testing.assert_close(prompt[0], result.targets[0].prompt_embedding.to(prompt.dtype), rtol=1e-4, atol=1e-5)
    agreement = ((logits[0] > 0).numpy() == result.targets[0].mask).mean()
    assert agreement > 0.999


def test_forward_gives_all_loss_terms_and_gradients(tokenizer, model):
    prepare_for_finetuning(model, TrainConfig())
    module = LisaForTraining(model.train(), tokenizer)
    batch = LisaCollator(tokenizer, model.config, max_length=512)(list(_two_samples()))
    losses = module(batch)
    assert set(losses) == {"loss", "ce", "bce", "dice", "iou", "appearance"}
    assert losses["iou"].item() == 0.0  # the official recipe leaves SAM's IoU head untrained
    assert losses["appearance"].item() == 0.0 and module.appearance_head is None
    assert losses["loss"].item() == pytest.approx(
        (losses["ce"] + losses["bce"] + losses["dice"]).item(), rel=1e-6
    )
    losses["loss"].backward()
    decoder = model.visual_model.mask_decoder
    decoder_grad = decoder.output_upscaling[0].weight.grad
    assert decoder_grad is not None and decoder_grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in model.vision_tower.parameters())
    iou_head = decoder.iou_prediction_head.layers[-1].weight
    assert iou_head.grad is None or iou_head.grad.abs().sum() == 0
    model.zero_grad(set_to_none=True)
    weighted = LisaForTraining(model, tokenizer, LossWeights(iou=1.0))(batch)
    assert weighted["iou"].item() > 0
    weighted["loss"].backward()
    assert iou_head.grad is not None and iou_head.grad.abs().sum() > 0
