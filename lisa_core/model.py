"""LisaModel: LLaVA (Llama + CLIP + projector), SAM, and the [SEG] projection, as in the official LISA.

Module names follow the official checkpoints one to one, under a fixed prefix mapping
(`official_to_internal` / `internal_to_official`):

    model.<llama body>        <-> language_model.model.<llama body>
    lm_head.*                 <-> language_model.lm_head.*
    model.mm_projector.*      <-> mm_projector.*
    model.visual_model.*      <-> visual_model.*          (segment-anything's Sam)
    model.text_hidden_fcs.*   <-> text_hidden_fcs.*
    model.vision_tower.vision_tower.vision_model.* <-> vision_tower.*  (CLIP; not in released checkpoints)
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Optional

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn
from transformers import CLIPVisionModel, LlamaForCausalLM, LlamaModel
from transformers.cache_utils import Cache

from lisa_core.config import LisaConfig, SamConfig
from lisa_core.preprocess import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from lisa_core.prompt import IMAGE_PLACEHOLDER_ID

# transformers renamed LlamaModel.forward's `past_key_values` to `cache` (5.2x); accept either.
_CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"

_OFFICIAL_PREFIXES = (  # (official, internal), most specific first
    ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
    ("model.mm_projector.", "mm_projector."),
    ("model.visual_model.", "visual_model."),
    ("model.text_hidden_fcs.", "text_hidden_fcs."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def official_to_internal(name: str) -> Optional[str]:
    """Our parameter name for an official checkpoint key, or None if the key is not LISA's."""
    for official, internal in _OFFICIAL_PREFIXES:
        if name.startswith(official):
            return internal + name[len(official):]
    return None


def internal_to_official(name: str) -> str:
    for official, internal in _OFFICIAL_PREFIXES:
        if name.startswith(internal):
            return official + name[len(internal):]
    raise KeyError(f"parameter {name!r} has no official name")


def build_sam(config: SamConfig) -> Sam:
    """segment-anything's Sam with the given sizes (ViT-H settings for the released models)."""
    embedding_size = config.image_embedding_size
    image_encoder = ImageEncoderViT(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        out_chans=config.prompt_embed_dim,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=config.window_size,
        global_attn_indexes=tuple(config.global_attn_indexes),
    )
    prompt_encoder = PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(config.image_size, config.image_size),
        mask_in_chans=config.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=config.prompt_embed_dim,
        transformer=TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.prompt_embed_dim,
            mlp_dim=config.decoder_mlp_dim,
            num_heads=config.decoder_num_heads,
        ),
        num_multimask_outputs=config.num_multimask_outputs,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    return Sam(image_encoder, prompt_encoder, mask_decoder, list(SAM_PIXEL_MEAN), list(SAM_PIXEL_STD))


class LisaModel(nn.Module):
    """The LISA network. Stateless helpers for each stage; generation lives in lisa_core.generate."""

    def __init__(self, config: LisaConfig) -> None:
        super().__init__()
        self.config = config
        self.language_model = LlamaForCausalLM(config.language_model.to_transformers())
        self.vision_tower = CLIPVisionModel(config.vision_tower.to_transformers())
        self.mm_projector = nn.Linear(config.vision_tower.hidden_size, config.language_model.hidden_size)
        self.visual_model = build_sam(config.sam)
        hidden = config.language_model.hidden_size
        self.text_hidden_fcs = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Linear(hidden, hidden),
                    nn.ReLU(inplace=True),
                    nn.Linear(hidden, config.out_dim),
                    nn.Dropout(0.0),
                )
            ]
        )

    # ---- multimodal LLM -------------------------------------------------------------------------

    def encode_clip(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected CLIP patch features (B, num_image_tokens, hidden) from (B, 3, 224, 224) pixels."""
        pixel_values = pixel_values.to(device=self.mm_projector.weight.device, dtype=self.vision_tower.dtype)
        outputs = self.vision_tower(pixel_values, output_hidden_states=True)
        patch_features = outputs.hidden_states[self.config.vision_select_layer][:, 1:]
        return self.mm_projector(patch_features.to(self.mm_projector.weight.dtype))

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids)

    def embed_prompt(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, hidden) with `image_features` (B, N, hidden) at the N placeholders.

        `input_ids` holds IMAGE_PLACEHOLDER_ID exactly N times per row (lisa_core.prompt builds it).
        """
        placeholders = input_ids == IMAGE_PLACEHOLDER_ID
        counts = placeholders.sum(dim=1)
        if not bool((counts == image_features.shape[1]).all()):
            raise ValueError(
                f"prompt has {counts.tolist()} image placeholders, expected {image_features.shape[1]}"
            )
        embeds = self.embed_tokens(input_ids.masked_fill(placeholders, 0))
        embeds = embeds.clone()
        embeds[placeholders] = image_features.reshape(-1, image_features.shape[-1]).to(embeds.dtype)
        return embeds

    def language_forward(
        self,
        inputs_embeds: torch.Tensor,
        *,
        cache: Optional[Cache] = None,
        position_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Last-layer hidden states after the final norm (B, L, hidden); fills `cache` when given."""
        outputs = self.language_model.model(
            inputs_embeds=inputs_embeds,
            use_cache=cache is not None,
            **{_CACHE_ARGUMENT: cache},
            position_ids=position_ids,
            attention_mask=attention_mask,
        )
        return outputs.last_hidden_state

    def lm_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden_states)

    def project_seg(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[SEG] hidden states (..., hidden) -> SAM prompt tokens (..., out_dim)."""
        return self.text_hidden_fcs[0](hidden_states)

    # ---- SAM ------------------------------------------------------------------------------------

    @property
    def sam_dtype(self) -> torch.dtype:
        return self.visual_model.mask_decoder.iou_token.weight.dtype

    def sam_image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """SAM image embeddings (B, prompt_dim, 64, 64) from preprocessed (B, 3, 1024, 1024) pixels."""
        encoder = self.visual_model.image_encoder
        return encoder(pixel_values.to(device=encoder.pos_embed.device, dtype=self.sam_dtype))

    def decode_masks(
        self, image_embeddings: torch.Tensor, prompt_embeddings: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (N, 1, 256, 256) and IoU predictions (N, 1) for N prompt tokens.

        `image_embeddings` is one image (1, C, h, w); `prompt_embeddings` (N, out_dim) are projected
        [SEG] states, each the single sparse prompt of its own mask; the dense prompt is no_mask_embed.
        """
        prompt_encoder = self.visual_model.prompt_encoder
        prompt_embeddings = prompt_embeddings.to(device=image_embeddings.device, dtype=self.sam_dtype)
        sparse = prompt_embeddings.unsqueeze(1)
        height, width = prompt_encoder.image_embedding_size
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            prompt_embeddings.shape[0], -1, height, width
        )
        return self.visual_model.mask_decoder(
            image_embeddings=image_embeddings.to(self.sam_dtype),
            image_pe=prompt_encoder.get_dense_pe().to(self.sam_dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )

    def official_state_dict(self, include_vision_tower: bool = False) -> dict[str, torch.Tensor]:
        """The weights under official checkpoint names (CLIP left out, as in the released folders)."""
        state = {}
        for name, tensor in self.state_dict().items():
            if name.startswith("vision_tower.") and not include_vision_tower:
                continue
            state[internal_to_official(name)] = tensor
        return state
