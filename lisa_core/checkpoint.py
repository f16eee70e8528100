"""Load and save LISA checkpoints: the official released layout and our own single-file format.

Official layout (xinlai/LISA-7B-v1, LISA-13B-llama2-v1): `config.json` of a LLaVA-Llama model, weights in
`pytorch_model.bin` or shards `pytorch_model-XXXXX-of-YYYYY.bin` listed by `pytorch_model.bin.index.json`
(or the `.safetensors` equivalents), tokenizer files with [SEG], and no CLIP weights: the vision tower
comes from a separate CLIP folder (an argument, or the config's `vision_tower` name found in the local
Hugging Face cache; nothing is downloaded).

Our format: `lisa_config.json` (LisaConfig), `model.safetensors` (every weight, CLIP included, under
our module names), tokenizer files.

`.bin` files are read with `torch.load(weights_only=True)`: a pickle that would run code is refused.

Tokenisation as LISA was trained: the released models were trained and run with transformers 4.31,
whose slow Llama tokenizer (1) dropped the whitespace on both sides of tokens added with `add_tokens`
(<im_patch>, <im_start>, <im_end>, [SEG]): "USER: <im_start>" gave "USER:" + <im_start>, and
"<im_end>\nquery" gave <im_end> + "query"; and (2) was "legacy": every text piece between such tokens
got SentencePiece's leading "▁" ("▁query"). Newer transformers keep that whitespace and, for a
tokenizer_config.json without a "legacy" entry (the released ones), default to non-legacy. So the
official loader asks for legacy=True in that case and marks LISA's tokens lstrip/rstrip
(`strip_around_tokens`). Reading the released tokenizer.model needs sentencepiece and protobuf.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import zipfile
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoTokenizer, CLIPVisionConfig

from lisa_core.config import (
    LISA_ADDED_TOKENS,
    SEG_TOKEN,
    LanguageModelConfig,
    LisaConfig,
    SamConfig,
    VisionTowerConfig,
)
from lisa_core.errors import CheckpointError
from lisa_core.model import LisaModel, internal_to_official, official_to_internal

OUR_CONFIG = "lisa_config.json"
OUR_WEIGHTS = "model.safetensors"
OFFICIAL_CONFIG = "config.json"
OFFICIAL_MODEL_TYPES = ("llava", "llava_llama", "lisa")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CLIP_VISION_BODY = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")

PathLike = Union[str, Path]


# ---- reading ------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not readable JSON ({error})") from error


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of a weight file, read lazily (memory-mapped) so only one is held at a time."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    if path.suffix == ".safetensors":
        try:
            handle = safe_open(str(path), framework="pt")
            keys = list(handle.keys())
        except Exception as error:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
        for key in keys:
            yield key, handle.get_tensor(key)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds more than plain tensors (it could run code); {error}"
        ) from error
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable PyTorch weight file ({error})") from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    yield from state.items()


def _weight_files(directory: Path) -> list[Path]:
    """The weight files of an official folder, from its index when there is one."""
    for index_name in WEIGHT_INDEXES:
        index_path = directory / index_name
        if index_path.exists():
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no weight_map")
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (directory / name).is_file():
                    raise CheckpointError(f"{directory / name}: listed in {index_name} but missing")
            return [directory / name for name in files]
    for name in SINGLE_WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name]
    raise CheckpointError(
        f"{directory}: no weights found (expected {' or '.join(WEIGHT_INDEXES + SINGLE_WEIGHT_FILES)})"
    )


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build modules without allocating or initialising parameters; buffers stay real.

    Non-persistent buffers (rotary frequencies, SAM pixel statistics, CLIP position ids) are not in any
    checkpoint, so they must be computed by the constructors as usual.
    """
    register_parameter = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register_parameter


def _empty_model(config: LisaConfig) -> LisaModel:
    with _parameters_on_meta():
        return LisaModel(config)


class _StateLoader:
    """Fills a parameter-less LisaModel tensor by tensor, checking names and shapes."""

    def __init__(self, model: LisaModel, device: torch.device, dtype: torch.dtype, official_names: bool) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.official_names = official_names  # how errors name missing keys
        self.expected = dict(model.state_dict(keep_vars=True))
        self.loaded: set[str] = set()

    def load(self, name: str, tensor: torch.Tensor, source: Path, source_key: str) -> None:
        target = self.expected.get(name)
        if target is None:
            raise CheckpointError(f"{source}: unexpected key {source_key!r} (no such weight in LISA)")
        if tuple(tensor.shape) != tuple(target.shape):
            raise CheckpointError(
                f"{source}: key {source_key!r} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
            )
        module_name, _, attribute = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        if attribute in module._parameters:
            dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
            module._parameters[attribute] = nn.Parameter(tensor.to(device=self.device, dtype=dtype))
        else:  # a persistent buffer, e.g. SAM's positional-encoding matrix: keep its own precision
            module._buffers[attribute] = tensor.to(device=self.device, dtype=target.dtype)
        self.loaded.add(name)

    def check_complete(self, source: Path, skip_prefixes: tuple[str, ...] = ()) -> None:
        missing = [
            name for name in self.expected if name not in self.loaded and not name.startswith(skip_prefixes)
        ]
        if missing:
            rename = internal_to_official if self.official_names else str
            shown = ", ".join(repr(rename(name)) for name in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise CheckpointError(f"{source}: missing key(s) {shown}{more}")

    def finish(self) -> LisaModel:
        return self.model.to(self.device).eval()


def _load_tokenizer(directory: Path, config: LisaConfig, **options):
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **options)
    except Exception as error:
        raise CheckpointError(f"{directory}: tokenizer files missing or unreadable ({error})") from error
    seg_id = seg_token_id(tokenizer, config.seg_token)
    if seg_id >= config.language_model.vocab_size:
        raise CheckpointError(
            f"{directory}: tokenizer gives {config.seg_token} id {seg_id}, beyond the model's vocabulary "
            f"({config.language_model.vocab_size})"
        )
    return tokenizer


def strip_around_tokens(tokenizer, tokens: tuple[str, ...] = LISA_ADDED_TOKENS) -> None:
    """Make `tokenizer` drop whitespace on both sides of `tokens` (those it has), ids unchanged."""
    from tokenizers import AddedToken

    present = {index: token for index, token in tokenizer.added_tokens_decoder.items() if token.content in tokens}
    tokenizer.add_tokens(
        [
            AddedToken(token.content, lstrip=True, rstrip=True, normalized=False, special=token.special)
            for token in present.values()
        ]
    )
    for index, token in present.items():
        if tokenizer.convert_tokens_to_ids(token.content) != index:
            raise CheckpointError(f"re-registering {token.content} changed its id")


def seg_token_id(tokenizer, seg_token: str = SEG_TOKEN) -> int:
    """The [SEG] id as the tokenizer defines it (it differs between released models)."""
    ids = tokenizer(seg_token, add_special_tokens=False).input_ids
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        raise CheckpointError(f"the tokenizer has no {seg_token} token (it splits it into {ids})")
    return ids[0]


def _torch_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in names:
        raise CheckpointError(f"unknown dtype {dtype!r}: use fp32, bf16 or fp16")
    return names[dtype]


def from_pretrained(
    path: PathLike,
    *,
    device: Union[str, torch.device] = "cpu",
    dtype: Union[str, torch.dtype] = torch.float32,
    vision_tower: Optional[PathLike] = None,
):
    """(LisaModel, tokenizer) from our format or an official LISA folder, detected by its files."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: model folder not found")
    device = torch.device(device)
    dtype = _torch_dtype(dtype)
    if (directory / OUR_CONFIG).is_file():
        return _load_ours(directory, device, dtype)
    if (directory / OFFICIAL_CONFIG).is_file():
        return _load_official(directory, device, dtype, vision_tower)
    raise CheckpointError(f"{directory}: neither {OUR_CONFIG} (our format) nor {OFFICIAL_CONFIG} (official LISA) found")


def _load_ours(directory: Path, device: torch.device, dtype: torch.dtype):
    config = LisaConfig.from_dict(_read_json(directory / OUR_CONFIG))
    weights_path = directory / OUR_WEIGHTS
    loader = _StateLoader(_empty_model(config), device, dtype, official_names=False)
    for name, tensor in _read_tensors(weights_path):
        loader.load(name, tensor, weights_path, name)
    loader.check_complete(weights_path)
    return loader.finish(), _load_tokenizer(directory, config)


def _check_model_type(official: dict, source: Path) -> None:
    model_type = official.get("model_type")
    if model_type not in OFFICIAL_MODEL_TYPES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not a LISA / LLaVA-Llama model (expected one of "
            f"{', '.join(OFFICIAL_MODEL_TYPES)})"
        )


def lisa_config_from_official(official: dict, vision_config: CLIPVisionConfig, source: Path) -> LisaConfig:
    """LisaConfig for an official config.json; SAM is always ViT-H in the released models."""
    _check_model_type(official, source)
    try:
        heads = official["num_attention_heads"]
        rope = official.get("rope_parameters") or {}
        language_model = LanguageModelConfig(
            vocab_size=official["vocab_size"],
            hidden_size=official["hidden_size"],
            intermediate_size=official["intermediate_size"],
            num_hidden_layers=official["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=official.get("num_key_value_heads") or heads,
            max_position_embeddings=official.get("max_position_embeddings", 2048),
            rms_norm_eps=official.get("rms_norm_eps", 1e-6),
            rope_theta=official.get("rope_theta", rope.get("rope_theta", 10000.0)),
            hidden_act=official.get("hidden_act", "silu"),
            bos_token_id=official.get("bos_token_id", 1),
            eos_token_id=official.get("eos_token_id", 2),
            pad_token_id=official.get("pad_token_id") or 0,
        )
    except KeyError as error:
        raise CheckpointError(f"{source}: missing field {error.args[0]!r}") from error
    vision_tower = VisionTowerConfig(
        hidden_size=vision_config.hidden_size,
        intermediate_size=vision_config.intermediate_size,
        num_hidden_layers=vision_config.num_hidden_layers,
        num_attention_heads=vision_config.num_attention_heads,
        image_size=vision_config.image_size,
        patch_size=vision_config.patch_size,
        projection_dim=vision_config.projection_dim,
        hidden_act=vision_config.hidden_act,
        layer_norm_eps=vision_config.layer_norm_eps,
    )
    sam = official.get("lisa_sam")  # written by save_official_layout for non-ViT-H (tiny) models
    sam_config = SamConfig(**{**sam, "global_attn_indexes": tuple(sam["global_attn_indexes"])}) if sam else SamConfig()
    if official.get("out_dim", sam_config.prompt_embed_dim) != sam_config.prompt_embed_dim:
        raise CheckpointError(f"{source}: out_dim {official['out_dim']} differs from SAM's prompt width")
    return LisaConfig(
        language_model=language_model,
        vision_tower=vision_tower,
        sam=sam_config,
        vision_tower_name=official.get("vision_tower") or official.get("mm_vision_tower") or "",
        vision_select_layer=official.get("mm_vision_select_layer", -2),
        use_im_start_end=official.get("mm_use_im_start_end", True),
    )


def resolve_vision_tower(name_or_path: str, source: Path) -> Path:
    """A CLIP folder: a local path, or a hub name already in the local Hugging Face cache."""
    if not name_or_path:
        raise CheckpointError(f"{source}: no vision_tower named: pass the CLIP folder (vision_tower=...)")
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception as error:
        raise CheckpointError(
            f"{source}: vision tower {name_or_path!r} is neither a folder nor in the local Hugging Face "
            f"cache; download it once or pass its folder (vision_tower=...)"
        ) from error


def _load_official(directory: Path, device: torch.device, dtype: torch.dtype, vision_tower: Optional[PathLike]):
    config_path = directory / OFFICIAL_CONFIG
    official = _read_json(config_path)
    _check_model_type(official, config_path)
    clip_dir = resolve_vision_tower(
        str(vision_tower) if vision_tower else official.get("vision_tower") or official.get("mm_vision_tower") or "",
        config_path,
    )
    try:
        clip_config = CLIPVisionConfig.from_pretrained(str(clip_dir))
    except Exception as error:
        raise CheckpointError(f"{clip_dir}: not a CLIP model folder ({error})") from error
    config = lisa_config_from_official(official, clip_config, config_path)

    loader = _StateLoader(_empty_model(config), device, dtype, official_names=True)
    vision_tower_in_checkpoint = False
    for weight_path in _weight_files(directory):
        for key, tensor in _read_tensors(weight_path):
            if key.endswith("rotary_emb.inv_freq"):
                continue  # older transformers saved it; it is recomputed
            name = official_to_internal(key)
            if name is None:
                raise CheckpointError(f"{weight_path}: unexpected key {key!r} (no such weight in LISA)")
            vision_tower_in_checkpoint |= name.startswith("vision_tower.")
            loader.load(name, tensor, weight_path, key)
    loader.check_complete(directory, skip_prefixes=() if vision_tower_in_checkpoint else ("vision_tower.",))
    if not vision_tower_in_checkpoint:
        _load_clip(loader, clip_dir)
    tokenizer_config_path = directory / "tokenizer_config.json"
    tokenizer_config = _read_json(tokenizer_config_path) if tokenizer_config_path.is_file() else {}
    # A config without "legacy" was written before that option existed: it meant legacy Llama behaviour.
    options = {} if "legacy" in tokenizer_config else {"legacy": True}
    tokenizer = _load_tokenizer(directory, config, **options)
    strip_around_tokens(tokenizer)
    return loader.finish(), tokenizer


def _load_clip(loader: _StateLoader, clip_dir: Path) -> None:
    """CLIP vision weights from a CLIPVisionModel or a full CLIPModel folder (its text tower is skipped)."""
    for weight_path in _weight_files(clip_dir):
        for key, tensor in _read_tensors(weight_path):
            if key.startswith("vision_model."):
                name = key[len("vision_model."):]
            elif key.startswith(CLIP_VISION_BODY):  # a CLIPVisionModel saved without the prefix
                name = key
            else:
                continue
            loader.load("vision_tower." + name, tensor, weight_path, key)
    loader.check_complete(clip_dir)


# ---- writing ------------------------------------------------------------------------------------


def save_pretrained(model: LisaModel, tokenizer, path: PathLike) -> Path:
    """Our format: lisa_config.json, model.safetensors (all weights), tokenizer files."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save(directory / OUR_CONFIG)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / OUR_WEIGHTS), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(directory))
    return directory


def official_config_dict(model: LisaModel, vision_tower: str, dtype: torch.dtype) -> dict:
    """A config.json in the released LISA style (LLaVA-Llama fields plus LISA's)."""
    config = model.config
    language = config.language_model
    official = {
        "architectures": ["LISAForCausalLM"],
        "model_type": "llava",
        **{key: getattr(language, key) for key in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act",
            "bos_token_id", "eos_token_id", "pad_token_id")},
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "vision_tower": vision_tower,
        "mm_vision_tower": vision_tower,
        "mm_hidden_size": config.vision_tower.hidden_size,
        "mm_vision_select_layer": config.vision_select_layer,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": config.use_im_start_end,
        "mm_use_im_patch_token": False,
        "out_dim": config.out_dim,
        "train_mask_decoder": True,
    }
    if config.sam != SamConfig():
        official["lisa_sam"] = {**vars(config.sam), "global_attn_indexes": list(config.sam.global_attn_indexes)}
    return official


def save_official_layout(
    model: LisaModel,
    tokenizer,
    path: PathLike,
    *,
    vision_tower_dir: Optional[PathLike] = None,
    shard_size: int = 5 * 1024**3,
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Write the released LISA layout: config.json, sharded pytorch_model-*.bin + index, tokenizer.

    CLIP is not part of it: with `vision_tower_dir` the CLIP tower is written there as its own
    CLIPVisionModel folder and config.json names that folder; otherwise config.json names
    `model.config.vision_tower_name`. `dtype` converts floating weights (the releases store bf16).
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    vision_tower = model.config.vision_tower_name
    if vision_tower_dir is not None:
        model.vision_tower.save_pretrained(str(vision_tower_dir), safe_serialization=True)
        vision_tower = str(Path(vision_tower_dir).resolve())

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    total_size = 0
    for key, tensor in model.official_state_dict().items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > shard_size:
            shards.append({})
            shard_bytes = 0
        shards[-1][key] = tensor.clone()
        shard_bytes += size
        total_size += size

    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        name = f"pytorch_model-{index:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, directory / name)
        weight_map.update({key: name for key in shard})
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    saved_dtype = dtype or model.language_model.lm_head.weight.dtype
    official = official_config_dict(model, vision_tower, saved_dtype)
    (directory / OFFICIAL_CONFIG).write_text(json.dumps(official, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(directory))
    return directory
