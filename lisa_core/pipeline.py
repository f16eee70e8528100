"""LisaPipeline: image + query in, answer and one mask per [SEG] out; plus SAM-only tracking.

Per frame, CLIP and the SAM image encoder run once; with a `frame_key` their outputs are kept in a
small LRU cache, so several queries (`segment_many`, `segment_batch`) and tracking on one frame share
them. The pipeline keeps no conversation: callers pass each query's earlier turns as `history`.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from lisa_core.checkpoint import from_pretrained as load_checkpoint
from lisa_core.checkpoint import seg_token_id
from lisa_core.cuda_graph import CudaGraphed
from lisa_core.errors import ConfigurationError, GenerationCancelled, InputError
from lisa_core.generate import (
    CACHE_IMPLEMENTATIONS,
    GENERATION_MODES,
    GenerationOutput,
    KVDecoder,
    LogitsProcessor,
    TokenCallback,
    generate,
    generate_batch,
)
from lisa_core.model import LisaModel
from lisa_core.precision import PRECISIONS, QUANTIZATIONS
from lisa_core.frames import check_aspect_ratio, prepare_image
from lisa_core.preprocess import check_clip_framing, clip_preprocess, postprocess_masks, sam_preprocess
from lisa_core.prompt import Prompt, PromptBuilder, Turn
from lisa_core.result import (
    STAGE_DECODING_MASKS,
    STAGE_ENCODING,
    STAGE_GENERATING,
    Progress,
    SegmentationResult,
    SegmentRequest,
    Target,
)

DTYPES = dict(zip(PRECISIONS, (torch.float32, torch.bfloat16, torch.float16)))
DEFAULT_MAX_NEW_TOKENS = 128

# Progress of a query -> True to cancel it.
ProgressCallback = Callable[[Progress], bool]


@dataclass
class FrameFeatures:
    """What one image contributes to every query on it."""

    image_size: tuple[int, int]  # original (H, W)
    resized_size: tuple[int, int]  # (h, w) inside SAM's padded square
    clip_features: Optional[torch.Tensor]  # (1, num_image_tokens, hidden); None when only tracking
    sam_embeddings: torch.Tensor  # (1, prompt_dim, h', w')
    sam_ready: Optional[torch.cuda.Event] = None  # set while the SAM encoder runs on its own stream


class _Stopwatch:
    """Wall-clock stage timings that wait for the accelerator to finish each stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}
        self._start = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = self._now()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self._start
        self._start = now

    def add(self, timings: dict[str, float]) -> None:
        """Stages timed elsewhere (generation) that ran since the last lap."""
        self.timings.update(timings)
        self._start = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            # The current stream only: work on a side stream (the SAM encoder) keeps overlapping.
            torch.cuda.current_stream(self.device).synchronize()
        return time.perf_counter()


def _report(on_progress: Optional[ProgressCallback], progress: Progress) -> None:
    if on_progress is not None and on_progress(progress):
        raise GenerationCancelled(progress.tokens)


def _resolve_device(device: Union[str, torch.device]) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ConfigurationError(f"unknown device {device!r}: use 'cpu' or 'cuda'") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("device 'cuda' requested but PyTorch sees no CUDA GPU: use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise ConfigurationError(f"unsupported device {device}: use 'cpu' or 'cuda'")
    return device


def quantize_language_model(model: LisaModel, quantization: str, compute_dtype: torch.dtype) -> None:
    """Swap the Llama decoder layers' Linear modules for bitsandbytes 8-bit or 4-bit (NF4) ones.

    The embeddings, lm_head, CLIP, the projector, [SEG] projection and SAM keep `compute_dtype`.
    The weights are quantized when the model moves to the GPU.
    """
    import bitsandbytes as bnb

    for layer in model.language_model.model.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if not isinstance(child, nn.Linear):
                    continue
                if quantization == "8bit":
                    replacement = bnb.nn.Linear8bitLt(
                        child.in_features, child.out_features, bias=child.bias is not None,
                        has_fp16_weights=False, threshold=6.0,
                    )
                    replacement.weight = bnb.nn.Int8Params(
                        child.weight.data.to(torch.float16), requires_grad=False, has_fp16_weights=False
                    )
                else:
                    replacement = bnb.nn.Linear4bit(
                        child.in_features, child.out_features, bias=child.bias is not None,
                        compute_dtype=compute_dtype, quant_type="nf4",
                    )
                    replacement.weight = bnb.nn.Params4bit(
                        child.weight.data, requires_grad=False, quant_type="nf4"
                    )
                if child.bias is not None:
                    replacement.bias = nn.Parameter(child.bias.data, requires_grad=False)
                setattr(parent, name, replacement)


class LisaPipeline:
    """LISA inference on RGB uint8 images. Thread-safe: one query runs at a time."""

    def __init__(
        self,
        model: LisaModel,
        tokenizer,
        *,
        generation_mode: str = "cached",
        cache_implementation: str = "dynamic",
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        frame_cache_size: int = 4,
        logits_processor: Optional[LogitsProcessor] = None,
        compile_decoder: bool = False,
        compile_encoders: bool = False,
        overlap_sam_encoder: bool = False,
        preprocess_on_device: bool = False,
    ) -> None:
        """`logits_processor` edits next-token logits before the argmax (constrained decoding, tests).

        Speed settings (each falls back to the plain path when off; see bench/bench_gpu.py):
        - cache_implementation="static" with compile_decoder=True: decoding steps as CUDA graphs;
        - compile_encoders: torch.compile the CLIP tower and the SAM image encoder (fixed input
          sizes) and, on a GPU, replay each as one CUDA graph;
        - overlap_sam_encoder: on a GPU, run the SAM encoder on its own CUDA stream while CLIP,
          prefill and decoding run, and wait for it only when the masks are decoded;
        - preprocess_on_device: resize frames with torch on the model's device instead of PIL on the
          CPU (within one grey level of PIL; the default PIL path is bit-exact with the official code).
        """
        if generation_mode not in GENERATION_MODES:
            raise ConfigurationError(f"generation_mode must be one of {GENERATION_MODES}, got {generation_mode!r}")
        if cache_implementation not in CACHE_IMPLEMENTATIONS:
            raise ConfigurationError(
                f"cache_implementation must be one of {CACHE_IMPLEMENTATIONS}, got {cache_implementation!r}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.device = model.mm_projector.weight.device
        self.generation_mode = generation_mode
        self.decoder = KVDecoder(model, cache_implementation, compile=compile_decoder)
        self.max_new_tokens = max_new_tokens
        self.logits_processor = logits_processor
        self.seg_token_id = seg_token_id(tokenizer, self.config.seg_token)
        self.eos_token_id = tokenizer.eos_token_id
        self.prompt_builder = PromptBuilder(
            tokenizer,
            self.config.num_image_tokens,
            self.config.language_model.max_position_embeddings,
            image_token=self.config.image_token,
            im_start_token=self.config.im_start_token,
            im_end_token=self.config.im_end_token,
            use_im_start_end=self.config.use_im_start_end,
        )
        self._answer_skip_ids = self._special_ids_except_seg()
        self._frame_cache: "OrderedDict[Hashable, FrameFeatures]" = OrderedDict()
        self._frame_cache_size = frame_cache_size
        self._lock = threading.RLock()
        self._resize_backend = "torch" if preprocess_on_device else "pil"
        self._encode_sam, self._encode_clip = (
            CudaGraphed(torch.compile(encoder)) if compile_encoders else encoder
            for encoder in (self.model.sam_image_embeddings, self.model.encode_clip)
        )
        self._sam_stream = (
            torch.cuda.Stream(self.device) if overlap_sam_encoder and self.device.type == "cuda" else None
        )

    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, Path],
        device: Union[str, torch.device] = "cpu",
        dtype: str = "fp32",
        quantization: Optional[str] = None,
        vision_tower: Optional[Union[str, Path]] = None,
        clip_framing: Optional[str] = None,
        **settings,
    ) -> "LisaPipeline":
        """Load our format or an official LISA folder. `settings` go to the constructor.

        `clip_framing` (lisa_core.preprocess.CLIP_FRAMINGS) overrides the model's: our folders keep the
        one they were saved with, official folders are "crop", as the released models were trained.
        """
        if clip_framing is not None:
            check_clip_framing(clip_framing)
        device = _resolve_device(device)
        if dtype not in DTYPES:
            raise ConfigurationError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        if quantization not in QUANTIZATIONS:
            raise ConfigurationError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        torch_dtype = DTYPES[dtype]
        if quantization is not None:
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ConfigurationError(
                    f"quantization={quantization!r} needs the bitsandbytes package: pip install bitsandbytes"
                )
            if device.type != "cuda":
                raise ConfigurationError(f"quantization={quantization!r} needs device='cuda'")
            if torch_dtype == torch.float32:
                torch_dtype = torch.float16  # SAM and the unquantized parts stay 16-bit
            model, tokenizer = load_checkpoint(path, device="cpu", dtype=torch_dtype, vision_tower=vision_tower)
            quantize_language_model(model, quantization, torch_dtype)
            model = model.to(device)
        else:
            model, tokenizer = load_checkpoint(path, device=device, dtype=torch_dtype, vision_tower=vision_tower)
        if clip_framing is not None:
            model.config.clip_framing = clip_framing
        return cls(model, tokenizer, **settings)

    # ---- public API -----------------------------------------------------------------------------

    def segment(
        self,
        image: np.ndarray,
        query: str,
        *,
        frame_key: Optional[Hashable] = None,
        max_new_tokens: Optional[int] = None,
        history: Sequence[Turn] = (),
        max_prompt_tokens: Optional[int] = None,
        on_progress: Optional[ProgressCallback] = None,
    ) -> SegmentationResult:
        """Answer `query` about `image`; each [SEG] in the answer becomes one Target.

        `history`: the conversation's earlier turns, oldest first, each `Turn(query, result.answer)`;
        the caller keeps them. The oldest are dropped to fit the context window (less max_new_tokens)
        and `max_prompt_tokens`; the result counts the turns used and dropped.
        `on_progress` is called with a Progress once at "encoding", after every generated token and
        once at "decoding_masks"; returning True cancels the query (GenerationCancelled, raised
        before the next decoding step).
        """
        with self._lock:
            image = prepare_image(image)
            max_new_tokens = self._max_new_tokens(max_new_tokens)
            prompt = self.prompt_builder(query, history, max_new_tokens, max_prompt_tokens)
            stopwatch = _Stopwatch(self.device)
            _report(on_progress, Progress(STAGE_ENCODING, "", 0))
            frame = self._frame_features(image, frame_key, stopwatch, need_clip=True)
            output = self._generate(self._embed(frame, prompt), max_new_tokens, self._streamer(on_progress))
            stopwatch.add(output.timings)
            answer = self.decode_answer(output.output_ids)
            _report(on_progress, Progress(STAGE_DECODING_MASKS, answer, len(output.output_ids)))
            return self._result(frame, query, prompt, output, answer, stopwatch)

    def segment_many(self, requests: Sequence[SegmentRequest]) -> list[SegmentationResult]:
        """One result per request, in order; each frame is encoded once, the LLM decodes them together.

        Requests with the same image array, or the same `frame_key` (frame cache), share CLIP and the
        SAM encoder; the first result on a frame reports their timings. With the cached dynamic-cache
        decoder all prompts go through the LLM as one left-padded batch (same tokens as one at a time,
        [SEG] states equal up to float rounding), each row stopping at its own max_new_tokens, and every
        result reports the batch's prefill and decode; otherwise they are decoded one by one.
        Every request is checked before any work: a bad one is an InputError naming its index.
        """
        if isinstance(requests, SegmentRequest):
            raise InputError("segment_many takes a list of SegmentRequest, got a single one")
        requests = list(requests)
        with self._lock:
            images, limits, prompts = [], [], []
            for index, request in enumerate(requests):
                if not isinstance(request, SegmentRequest):
                    raise InputError(f"requests[{index}] must be a SegmentRequest, got {type(request).__name__}")
                try:
                    images.append(prepare_image(request.image))
                    check_aspect_ratio(*images[-1].shape[:2])
                    limits.append(self._max_new_tokens(request.max_new_tokens))
                    prompts.append(
                        self.prompt_builder(request.query, request.history, limits[-1], request.max_prompt_tokens)
                    )
                except InputError as error:
                    key = "" if request.frame_key is None else f" (frame_key {request.frame_key!r})"
                    raise InputError(f"requests[{index}]{key}: {error}") from error
            stopwatches, frames = [], []
            encoded: dict[tuple, FrameFeatures] = {}
            for request, image in zip(requests, images):
                stopwatch = _Stopwatch(self.device)
                group = (request.frame_key, id(request.image))
                if group not in encoded:
                    encoded[group] = self._frame_features(image, request.frame_key, stopwatch, need_clip=True)
                stopwatches.append(stopwatch)
                frames.append(encoded[group])
            embeds = [self._embed(frame, prompt) for frame, prompt in zip(frames, prompts)]
            if self._batches_queries() and len(requests) > 1:
                outputs = generate_batch(
                    self.model,
                    embeds,
                    seg_token_id=self.seg_token_id,
                    eos_token_id=self.eos_token_id,
                    max_new_tokens=limits,
                    logits_processor=self.logits_processor,
                )
            else:
                outputs = [self._generate(embed, limit) for embed, limit in zip(embeds, limits)]
            results = []
            for request, frame, prompt, output, stopwatch in zip(requests, frames, prompts, outputs, stopwatches):
                stopwatch.add(output.timings)
                answer = self.decode_answer(output.output_ids)
                results.append(self._result(frame, request.query, prompt, output, answer, stopwatch))
            return results

    def segment_batch(
        self,
        image: np.ndarray,
        queries: Sequence[str],
        *,
        frame_key: Optional[Hashable] = None,
        max_new_tokens: Optional[int] = None,
    ) -> list[SegmentationResult]:
        """Several standalone queries on one image: `segment_many` with one request per query."""
        if isinstance(queries, str):
            raise InputError("segment_batch takes a list of queries, got a single string")
        image = prepare_image(image)
        return self.segment_many(
            [SegmentRequest(image, query, frame_key=frame_key, max_new_tokens=max_new_tokens) for query in queries]
        )

    def track(
        self,
        image: np.ndarray,
        prompt_embeddings: Sequence[torch.Tensor],
        *,
        frame_key: Optional[Hashable] = None,
    ) -> list[Target]:
        """Masks on `image` for earlier targets' prompt embeddings, with SAM alone (no LLM)."""
        with self._lock:
            image = prepare_image(image)
            stopwatch = _Stopwatch(self.device)
            frame = self._frame_features(image, frame_key, stopwatch, need_clip=False)
            if len(prompt_embeddings) == 0:
                return []
            prompts = torch.stack([torch.as_tensor(embedding).reshape(-1) for embedding in prompt_embeddings])
            if prompts.shape[1] != self.config.out_dim:
                raise InputError(
                    f"prompt embeddings must have {self.config.out_dim} values, got {prompts.shape[1]}"
                )
            return self._decode_targets(frame, prompts, stopwatch)

    # ---- stages ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _frame_features(
        self, image: np.ndarray, frame_key: Optional[Hashable], stopwatch: _Stopwatch, need_clip: bool
    ) -> FrameFeatures:
        image_size = (int(image.shape[0]), int(image.shape[1]))
        cached = self._frame_cache.get(frame_key) if frame_key is not None else None
        if cached is not None and cached.image_size != image_size:
            cached = None  # the key was reused for a different image
        if cached is not None:
            self._frame_cache.move_to_end(frame_key)
            if cached.clip_features is not None or not need_clip:
                return cached
        if cached is not None:
            resized_size, sam_embeddings, sam_ready = cached.resized_size, cached.sam_embeddings, cached.sam_ready
        else:
            resized_size, sam_embeddings, sam_ready = self._run_sam_encoder(image)
            stopwatch.lap("sam_encoder")
        clip_features = None
        if need_clip:
            check_aspect_ratio(*image_size)
            clip_pixels = clip_preprocess(
                image,
                size=self.config.vision_tower.image_size,
                device=self.device,
                resize_backend=self._resize_backend,
                framing=self.config.clip_framing,
            )
            clip_features = self._encode_clip(clip_pixels.unsqueeze(0))
            stopwatch.lap("clip")
        frame = FrameFeatures(image_size, resized_size, clip_features, sam_embeddings, sam_ready)
        if frame_key is not None:
            self._frame_cache[frame_key] = frame
            self._frame_cache.move_to_end(frame_key)
            while len(self._frame_cache) > self._frame_cache_size:
                self._frame_cache.popitem(last=False)
        return frame

    def _run_sam_encoder(self, image: np.ndarray):
        """(resized (h, w), embeddings, ready event or None); on the side stream when overlapping."""

        def encode():
            pixels, resized_size = sam_preprocess(
                image, size=self.config.sam.image_size, device=self.device, resize_backend=self._resize_backend
            )
            return resized_size, self._encode_sam(pixels.unsqueeze(0))

        if self._sam_stream is None:
            return (*encode(), None)
        main_stream = torch.cuda.current_stream(self.device)
        self._sam_stream.wait_stream(main_stream)
        with torch.cuda.stream(self._sam_stream):
            resized_size, embeddings = encode()
            ready = torch.cuda.Event()
            ready.record(self._sam_stream)
        embeddings.record_stream(main_stream)  # used on the main stream: keep its memory until then
        return resized_size, embeddings, ready

    def _batches_queries(self) -> bool:
        """Several queries go through the LLM as one batch unless decoding is static-cache (batch 1)."""
        return self.generation_mode == "cached" and self.decoder.cache_implementation == "dynamic"

    def _max_new_tokens(self, max_new_tokens: Optional[int]) -> int:
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        return max_new_tokens

    @torch.no_grad()
    def _embed(self, frame: FrameFeatures, prompt: Prompt) -> torch.Tensor:
        return self.model.embed_prompt(torch.tensor([prompt.input_ids], device=self.device), frame.clip_features)

    def _streamer(self, on_progress: Optional[ProgressCallback]) -> Optional[TokenCallback]:
        """generate's on_token for a Progress callback: the answer so far after every token."""
        if on_progress is None:
            return None

        def on_token(output_ids: list[int]) -> bool:
            return bool(on_progress(Progress(STAGE_GENERATING, self.decode_answer(output_ids), len(output_ids))))

        return on_token

    def _generate(
        self, inputs_embeds: torch.Tensor, max_new_tokens: int, on_token: Optional[TokenCallback] = None
    ) -> GenerationOutput:
        return generate(
            self.model,
            inputs_embeds,
            seg_token_id=self.seg_token_id,
            eos_token_id=self.eos_token_id,
            max_new_tokens=max_new_tokens,
            mode=self.generation_mode,
            decoder=self.decoder,
            logits_processor=self.logits_processor,
            on_token=on_token,
        )

    @torch.no_grad()
    def _result(
        self,
        frame: FrameFeatures,
        query: str,
        prompt: Prompt,
        output: GenerationOutput,
        answer: str,
        stopwatch: _Stopwatch,
    ) -> SegmentationResult:
        targets = []
        if output.seg_hidden_states.shape[0] > 0:
            prompts = self.model.project_seg(output.seg_hidden_states)
            targets = self._decode_targets(frame, prompts, stopwatch)
        stopwatch.timings["total"] = sum(stopwatch.timings.values())
        return SegmentationResult(
            query=query,
            answer=answer,
            targets=targets,
            image_size=frame.image_size,
            output_ids=list(output.output_ids),
            timings=dict(stopwatch.timings),
            history_turns=prompt.history_turns,
            turns_dropped=prompt.turns_dropped,
        )

    @torch.no_grad()
    def _decode_targets(self, frame: FrameFeatures, prompts: torch.Tensor, stopwatch: _Stopwatch) -> list[Target]:
        if frame.sam_ready is not None:
            torch.cuda.current_stream(self.device).wait_event(frame.sam_ready)
            stopwatch.lap("sam_encoder")
        low_res_logits, iou_predictions = self.model.decode_masks(frame.sam_embeddings, prompts)
        stopwatch.lap("mask_decoder")
        logits = postprocess_masks(low_res_logits, frame.resized_size, frame.image_size, size=self.config.sam.image_size)
        masks = (logits > 0).cpu().numpy()
        iou_values = iou_predictions[:, 0].float().cpu().tolist()
        embeddings = prompts.detach().float().cpu()
        targets = [
            Target.from_mask(mask, iou_prediction, embedding)
            for mask, iou_prediction, embedding in zip(masks, iou_values, embeddings)
        ]
        stopwatch.lap("postprocess")
        return targets

    def _special_ids_except_seg(self) -> set[int]:
        special = set(self.tokenizer.all_special_ids)
        special.update(index for index, token in self.tokenizer.added_tokens_decoder.items() if token.special)
        special.discard(self.seg_token_id)
        return special

    def decode_answer(self, output_ids: Sequence[int]) -> str:
        """Answer text: special tokens other than [SEG] removed, whitespace runs collapsed."""
        kept = [index for index in output_ids if index not in self._answer_skip_ids]
        return " ".join(self.tokenizer.decode(kept, skip_special_tokens=False).split())
