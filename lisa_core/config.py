"""LISA's architecture as one explicit configuration: the language model, CLIP, SAM and the glue.

`LisaConfig.lisa_7b()` and `LisaConfig.lisa_13b()` describe the released checkpoints exactly
(LISA-7B-v1 and LISA-13B-llama2-v1); `LisaConfig.tiny()` is a few-layer model for CPU tests and demos.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from transformers import CLIPVisionConfig, LlamaConfig

from lisa_core.errors import ConfigurationError
from lisa_core.preprocess import check_clip_framing

CLIP_VIT_L_14 = "openai/clip-vit-large-patch14"
SEG_TOKEN = "[SEG]"
IM_PATCH_TOKEN = "<im_patch>"
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
LISA_ADDED_TOKENS = (IM_PATCH_TOKEN, IM_START_TOKEN, IM_END_TOKEN, SEG_TOKEN)  # the LISA-7B-v1 order


@dataclass
class LanguageModelConfig:
    """The Llama decoder (LLaVA v1 language model); field names are LlamaConfig's."""

    vocab_size: int = 32004
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0

    def to_transformers(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            hidden_act=self.hidden_act,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        )


@dataclass
class VisionTowerConfig:
    """The CLIP vision encoder; field names are CLIPVisionConfig's."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 768
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_transformers(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            projection_dim=self.projection_dim,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
        )


@dataclass
class SamConfig:
    """segment-anything's ViT image encoder, prompt encoder and mask decoder (defaults: ViT-H)."""

    image_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 1280
    depth: int = 32
    num_heads: int = 16
    global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256  # the encoder's out_chans, the decoder's width and the [SEG] projection's
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    @property
    def image_embedding_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class LisaConfig:
    """Everything needed to build a LisaModel; tokens are named here, their ids come from the tokenizer."""

    language_model: LanguageModelConfig = field(default_factory=LanguageModelConfig)
    vision_tower: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    vision_tower_name: str = CLIP_VIT_L_14  # where the CLIP weights come from (not in LISA checkpoints)
    vision_select_layer: int = -2  # CLIP hidden state fed to the projector; CLS is dropped
    use_im_start_end: bool = True
    seg_token: str = SEG_TOKEN
    im_start_token: str = IM_START_TOKEN
    im_end_token: str = IM_END_TOKEN
    image_token: str = "<image>"  # text placeholder replaced by the projected CLIP features
    clip_framing: str = "crop"  # how a frame becomes CLIP's square input: lisa_core.preprocess.CLIP_FRAMINGS

    def __post_init__(self) -> None:
        check_clip_framing(self.clip_framing)

    @property
    def num_image_tokens(self) -> int:
        return self.vision_tower.num_patches

    @property
    def out_dim(self) -> int:
        """Width of the projected [SEG] embedding, i.e. of a SAM prompt token."""
        return self.sam.prompt_embed_dim

    @classmethod
    def lisa_7b(cls) -> "LisaConfig":
        """LISA-7B-v1: LLaVA-v1 Llama-7B with <im_patch>, <im_start>, <im_end>, [SEG] added (vocab 32004)."""
        return cls(language_model=LanguageModelConfig(vocab_size=32004))

    @classmethod
    def lisa_13b(cls) -> "LisaConfig":
        """LISA-13B-llama2-v1: Llama-2-13B based, [SEG], <im_start>, <im_end> added (vocab 32003)."""
        return cls(
            language_model=LanguageModelConfig(
                vocab_size=32003,
                hidden_size=5120,
                intermediate_size=13824,
                num_hidden_layers=40,
                num_attention_heads=40,
                num_key_value_heads=40,
                max_position_embeddings=4096,
                rms_norm_eps=1e-5,
            )
        )

    @classmethod
    def tiny(cls, vocab_size: int = 512) -> "LisaConfig":
        """A few-layer LISA for CPU tests: CLIP still gives 256 patch tokens, SAM works at 256 px."""
        return cls(
            language_model=LanguageModelConfig(
                vocab_size=vocab_size,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=1024,
            ),
            vision_tower=VisionTowerConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                projection_dim=32,
            ),
            sam=SamConfig(
                image_size=256,
                embed_dim=32,
                depth=2,
                num_heads=2,
                global_attn_indexes=(1,),
                window_size=7,
                prompt_embed_dim=32,
                mask_in_chans=4,
                decoder_mlp_dim=64,
                decoder_num_heads=2,
                iou_head_hidden_dim=32,
            ),
            vision_tower_name="",
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["sam"]["global_attn_indexes"] = list(self.sam.global_attn_indexes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LisaConfig":
        data = dict(data)
        try:
            language_model = LanguageModelConfig(**data.pop("language_model", {}))
            vision_tower = VisionTowerConfig(**data.pop("vision_tower", {}))
            sam_fields = dict(data.pop("sam", {}))
            if "global_attn_indexes" in sam_fields:
                sam_fields["global_attn_indexes"] = tuple(sam_fields["global_attn_indexes"])
            sam = SamConfig(**sam_fields)
            return cls(language_model=language_model, vision_tower=vision_tower, sam=sam, **data)
        except TypeError as error:  # an unknown field name
            raise ConfigurationError(f"invalid LISA config: {error}") from error

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LisaConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "LisaConfig":
        return cls.from_json(Path(path).read_text())
