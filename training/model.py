"""The trainable LISA: teacher-forced forward with masks, the recipe's trainable set, LoRA and its merge.

`LisaForTraining` wraps a lisa_core `LisaModel` and runs, for a `LisaBatch`:
CLIP -> mm_projector -> image features placed at the placeholders -> Llama over the whole conversation
(answers included: teacher forcing) -> text cross-entropy on the answer tokens; the last-layer,
final-norm hidden states at the positions that *predict* each [SEG] (the position just before it, as
at inference) -> text_hidden_fcs -> one sparse prompt per [SEG] for SAM's mask decoder on that
image's SAM embedding -> low-res logits postprocessed to the image's original size -> BCE and DICE
against the ground truth (training.losses). With `loss_weights.appearance` set, an AppearanceHead on the
same SAM embeddings predicts per-pixel classes (training.losses.appearance_cross_entropy); it is not part
of the LisaModel, so export leaves it out.

`prepare_for_finetuning` sets what trains:
- "lora" (the recipe): LoRA adapters (peft) on the modules whose full name matches
  `config.lora_target_regex` (the language model's q_proj / v_proj, not CLIP's), plus full training of
  the parameters whose names contain one of `config.trainable_modules`; everything else frozen;
- "full": every parameter trains except those named in `config.frozen_modules_full` (for models that
  start from random weights, such as the demo).
`merge_lora` folds the adapters back into plain Linear layers, leaving a LisaModel that lisa_core saves
and loads like any other.
"""

from __future__ import annotations

import re
from typing import Sequence
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from lisa_core.checkpoint import seg_token_id
from lisa_core.errors import ConfigurationError, InputError
from lisa_core.model import LisaModel
from lisa_core.preprocess import postprocess_masks
from training.collate import IGNORE_INDEX, LisaBatch
from training.config import TrainConfig
from training.losses import LossWeights, appearance_cross_entropy, lisa_loss


class AppearanceHead(nn.Module):
    """One 1x1 convolution from SAM's image embedding (B, C, h, w) to the logits of K class maps, a
    (B, C_k, h, w) tensor for each."""

    def __init__(self, embedding_dim: int, classes: Sequence[int]) -> None:
        super().__init__()
        self.classes = tuple(classes)
        self.classifier = nn.Conv2d(embedding_dim, sum(self.classes), kernel_size=1)

    def forward(self, image_embeddings: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return torch.split(self.classifier(image_embeddings), self.classes, dim=1)


class LisaForTraining(nn.Module):
    """LisaModel plus the training forward; `forward(batch)` returns a dict of loss tensors.

    `appearance_classes` (the class count of each map of `batch.appearance`) adds an AppearanceHead;
    it is needed when `loss_weights.appearance` is not 0.
    """

    def __init__(
        self,
        model: LisaModel,
        tokenizer,
        loss_weights: LossWeights = LossWeights(),
        appearance_classes: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.model = model
        self.seg_token_id = seg_token_id(tokenizer, model.config.seg_token)
        self.loss_weights = loss_weights
        if loss_weights.appearance and not appearance_classes:
            raise ConfigurationError("an appearance loss weight needs the class count of each appearance map")
        self.appearance_head = (
            AppearanceHead(model.config.sam.prompt_embed_dim, appearance_classes) if appearance_classes else None
        )

    def language_outputs(self, batch: LisaBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-layer hidden states (C, L, hidden) and logits (C, L, vocab) with the answers fed."""
        model = self.model
        image_features = model.encode_clip(batch.clip_pixels)[batch.conversation_image]
        embeds = model.embed_prompt(batch.input_ids, image_features)
        hidden = model.language_forward(embeds, attention_mask=batch.attention_mask)
        return hidden, model.lm_logits(hidden)

    def seg_states(self, input_ids: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states predicting each [SEG] (S, hidden), in row order, and the [SEG] count per row."""
        predicts_seg = torch.zeros_like(input_ids, dtype=torch.bool)
        predicts_seg[:, :-1] = input_ids[:, 1:] == self.seg_token_id
        return hidden[predicts_seg], predicts_seg.sum(dim=1)

    def masks_from_states(
        self, batch: LisaBatch, image_embeddings: torch.Tensor, seg_hidden: torch.Tensor, segs_per_row: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Mask logits per image (N_b, H, W) at the original size and SAM's IoU predictions (N_b,), from
        the images' SAM embeddings and the [SEG] states of their rows."""
        model = self.model
        prompts = model.project_seg(seg_hidden)
        segs_per_image = torch.zeros(batch.num_images, dtype=torch.long, device=segs_per_row.device)
        segs_per_image.index_add_(0, batch.conversation_image.to(segs_per_row.device), segs_per_row)
        predictions, iou_predictions, start = [], [], 0
        for index, count in enumerate(segs_per_image.tolist()):
            height, width = batch.original_sizes[index]
            if count == 0:
                predictions.append(prompts.new_zeros((0, height, width), dtype=torch.float32))
                iou_predictions.append(prompts.new_zeros((0,), dtype=torch.float32))
                continue
            low_res, predicted_iou = model.decode_masks(image_embeddings[index : index + 1], prompts[start : start + count])
            start += count
            predictions.append(
                postprocess_masks(
                    low_res, batch.resized_sizes[index], (height, width), size=model.config.sam.image_size
                )
            )
            iou_predictions.append(predicted_iou[:, 0])
        return predictions, iou_predictions

    def predict_masks(self, batch: LisaBatch) -> list[torch.Tensor]:
        """Mask logits per image for the [SEG] tokens already in `batch.input_ids` (no loss)."""
        hidden, _ = self.language_outputs(batch)
        image_embeddings = self.model.sam_image_embeddings(batch.sam_pixels)
        return self.masks_from_states(batch, image_embeddings, *self.seg_states(batch.input_ids, hidden))[0]

    def forward(self, batch: LisaBatch) -> dict[str, torch.Tensor]:
        hidden, logits = self.language_outputs(batch)
        ce = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
        image_embeddings = self.model.sam_image_embeddings(batch.sam_pixels)
        predictions, iou_predictions = self.masks_from_states(
            batch, image_embeddings, *self.seg_states(batch.input_ids, hidden)
        )
        gt_masks = [mask.to(prediction.device) for mask, prediction in zip(batch.gt_masks, predictions)]
        appearance = None
        if self.loss_weights.appearance:
            if batch.appearance is None:
                raise InputError("an appearance loss weight needs batches with appearance maps (LisaCollator appearance_maps)")
            appearance = appearance_cross_entropy(self.appearance_head(image_embeddings), batch.appearance)
        loss = lisa_loss(ce, predictions, gt_masks, self.loss_weights, iou_predictions, appearance)
        return {
            "loss": loss.total, "ce": loss.ce, "bce": loss.bce, "dice": loss.dice, "iou": loss.iou,
            "appearance": loss.appearance,
        }


def _matches_any(name: str, fragments) -> bool:
    return any(fragment in name for fragment in fragments)


def prepare_for_finetuning(model: LisaModel, config: TrainConfig) -> LisaModel:
    """Set requires_grad (and add LoRA adapters for finetune="lora") in place; returns `model`."""
    if config.finetune == "full":
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(not _matches_any(name, config.frozen_modules_full))
        return model
    pattern = re.compile(config.lora_target_regex)
    targets = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and pattern.fullmatch(name)]
    if not targets:
        raise ConfigurationError(f"lora_target_regex {config.lora_target_regex!r} matches no Linear module")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_regex,
        bias="none",
    )
    inject_adapter_in_model(lora, model)
    for name, parameter in model.named_parameters():
        if "lora_" in name or _matches_any(name, config.trainable_modules):
            parameter.requires_grad_(True)
    return model


def lora_module_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def merge_lora(model: LisaModel) -> LisaModel:
    """Fold every LoRA adapter into its base Linear and put the plain Linear back, in place."""
    for name in lora_module_names(model):
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child_name)
        layer.merge()
        setattr(parent, child_name, layer.get_base_layer())
    return model


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def enable_gradient_checkpointing(model: LisaModel) -> None:
    """Recompute the language model's activations in backward (the recipe trains with it on).

    transformers 5.24 names this activation checkpointing; older 5.x releases (e.g. 5.17 on the GPU
    machines) only have the gradient_checkpointing_* name.
    """
    language_model = model.language_model
    if hasattr(language_model, "activation_checkpointing_enable"):
        language_model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
