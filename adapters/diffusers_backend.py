"""An in-process diffusers model: `AutoPipelineForText2Image` from a local path or a hub id.

One pipeline is not safe to call from two threads at once, so every call goes through one worker
thread, in order: a queue. Requests wait their turn (cancelled ones leave the queue); when more
than `max_queue` are waiting, a request gets 429 with Retry-After, which the openai SDK retries.
The model loads off the event loop at start-up; /readyz says false until it has.

Request mapping: `size` WIDTHxHEIGHT (rounded to the model's multiple of 16, the image resized
back to the size asked for; `auto` = the model's default), `quality` -> steps through
`steps_by_quality`, `n` in batches of `max_batch`, `output_format` and `output_compression`.
When the proxy passes them in `call.extra`, `seed` and `steps` are honoured too.
Edits: `AutoPipelineForImage2Image`, or `AutoPipelineForInpainting` with a mask (OpenAI masks:
transparent where the image may change), built from the loaded pipeline's components, so they
cost no extra memory. One input image per edit.

Options:
    model (required)          local folder or hub id (downloaded only if not cached, unless
                              local_files_only)
    device (auto)             auto (cuda, then mps, then cpu) | cuda | cuda:1 | mps | cpu
    dtype (auto)              auto (bfloat16 on CUDA where supported, else float16; float16 on
                              mps; float32 on cpu) | bfloat16 | float16 | float32
    variant (null)            weights variant, e.g. fp16
    local_files_only (false)
    steps (30), max_steps (100), steps_by_quality ({}), e.g. {low: 15, high: 50}
    guidance_scale (null: the pipeline's default)
    edit_strength (0.75)      how far an edit may move from the input image (0..1)
    seed (null)               fixed seed for reproducible images (image i gets seed + i)
    max_side (2048), max_batch (4), max_queue (32)
    preview_steps ([])        e.g. [8, 16]: after those denoising steps the current latents are
                              decoded into a preview the guard judges; an unsafe one interrupts
                              the pipeline (`pipe._interrupt`, diffusers' documented way) once
                              no image of its batch is left to finish. Generations only.
    preview_decoder (vae)     vae: the pipeline's own VAE on the current latents (a full decode
                              per preview); approx: a linear latent-to-RGB map of 4-channel
                              latents at 1/8 size, nearly free (SD 1.x/2.x factors: a rougher
                              picture for SDXL); other latents use the VAE

The pipeline does not wait for a preview's verdict: the verdict reaches the worker thread at a
later step's end, which interrupts the pipeline there. A pipeline without `callback_on_step_end`,
or whose latents its VAE cannot decode as they are (packed latents), makes its images without
previews. A cancelled request interrupts its pipeline the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import inspect
import io
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal, TypeVar

from PIL import Image
from pydantic import Field

from adapters.options import Options, parse_options
from guard.core.types import GeneratedImage, GenerationCall
from guard.plugins import Preview, PreviewAction, PreviewHandler
from guard.support.errors import (
    BackendError,
    BackendRateLimited,
    BackendRejected,
    ConfigError,
    GuardError,
)
from guard.support.torch_device import pick_device, pick_dtype

log = logging.getLogger("safeedit.backends")

T = TypeVar("T")

_MULTIPLE = 16
_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class DiffusersOptions(Options):
    model: str
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    variant: str | None = None
    local_files_only: bool = False
    steps: int = Field(30, ge=1)
    max_steps: int = Field(100, ge=1)
    steps_by_quality: dict[str, int] = Field(default_factory=dict)
    guidance_scale: float | None = Field(None, ge=0)
    edit_strength: float = Field(0.75, gt=0, le=1)
    seed: int | None = Field(None, ge=0)
    max_side: int = Field(2048, ge=_MULTIPLE)
    max_batch: int = Field(4, ge=1)
    max_queue: int = Field(32, ge=0)
    preview_steps: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)
    preview_decoder: Literal["vae", "approx"] = "vae"


class DiffusersBackend:
    def __init__(self, name: str, options: DiffusersOptions) -> None:
        self.name = name
        self.options = options
        self.device: str | None = None
        self.dtype: str | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"diffusers-{name}")
        self._pipes: dict[str, Any] = {}
        self._load_error: str | None = None
        self._queued = 0

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> DiffusersBackend:
        opts = parse_options(DiffusersOptions, name, "diffusers", options)
        missing = [m for m in ("torch", "diffusers") if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(f"backend {name!r} (diffusers) needs {' and '.join(missing)} "
                              "installed")
        return cls(name, opts)

    # --- the queue ------------------------------------------------------------------------

    async def _run(self, job: Callable[[], T]) -> T:
        if self._queued > self.options.max_queue:
            raise BackendRateLimited(f"backend {self.name!r} is busy ({self._queued} requests "
                                     "queued)", headers={"retry-after": "1"})
        self._queued += 1
        try:
            # Cancelling the wait takes a job that has not started out of the queue.
            return await asyncio.wrap_future(self._worker.submit(job))
        finally:
            self._queued -= 1

    async def start(self) -> None:
        """Load the model off the event loop (the proxy calls this at start-up)."""
        with contextlib.suppress(BackendError):  # logged where it happened; /readyz says false
            await self._run(self._pipe)

    async def ready(self) -> bool:
        return "text2image" in self._pipes

    async def aclose(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        self._pipes.clear()

    # --- requests -------------------------------------------------------------------------

    async def generate(self, call: GenerationCall) -> list[GeneratedImage]:
        return await self._run(lambda: self._generate(call))

    def shows_previews(self, call: GenerationCall) -> bool:
        return bool(self.options.preview_steps)

    async def generate_previewed(self, call: GenerationCall, on_preview: PreviewHandler
                                 ) -> list[GeneratedImage | None]:
        watch = _Watch(asyncio.get_running_loop(), on_preview, self.options)
        try:
            images: list[GeneratedImage | None] = list(
                await self._run(lambda: self._generate(call, watch)))
        finally:
            watch.halted = True  # cancelled: the pipeline stops at its next step
        stopped = {index for index, action in
                   zip(watch.shown, await asyncio.gather(*map(asyncio.wrap_future,
                                                              watch.verdicts)), strict=True)
                   if action == "stop"}
        return [None if i in stopped else image for i, image in enumerate(images)]

    async def edit(self, call: GenerationCall, images: list[bytes],
                   mask: bytes | None) -> list[GeneratedImage]:
        if len(images) != 1:
            raise BackendRejected(f"backend {self.name!r} edits one image at a time, not "
                                  f"{len(images)}", param="image", code="invalid_value")
        return await self._run(lambda: self._edit(call, images[0], mask))

    # --- in the worker thread -------------------------------------------------------------

    def _pipe(self, kind: str = "text2image") -> Any:
        if kind in self._pipes:
            return self._pipes[kind]
        if self._load_error:
            raise BackendError(self._load_error, code="backend_unavailable")
        import diffusers

        if "text2image" not in self._pipes:
            opts = self.options
            try:
                device = pick_device(opts.device)
                dtype = pick_dtype(opts.dtype, device)
                pipe = diffusers.AutoPipelineForText2Image.from_pretrained(
                    opts.model, dtype=dtype, variant=opts.variant,
                    local_files_only=opts.local_files_only)
                pipe = pipe.to(device)
            except Exception as exc:  # noqa: BLE001 - missing files, bad config, no such device
                self._load_error = (f"backend {self.name!r} could not load its model "
                                    f"({type(exc).__name__})")
                log.error("%s from %s: %s", self._load_error, opts.model, exc)
                raise BackendError(self._load_error, code="backend_unavailable") from exc
            pipe.set_progress_bar_config(disable=True)
            self.device, self.dtype = device, str(dtype).removeprefix("torch.")
            self._pipes["text2image"] = pipe
            log.info("backend %s: %s on %s (%s)", self.name, type(pipe).__name__, device,
                     self.dtype)
        if kind != "text2image":
            auto = {"image2image": diffusers.AutoPipelineForImage2Image,
                    "inpaint": diffusers.AutoPipelineForInpainting}[kind]
            try:
                pipe = auto.from_pipe(self._pipes["text2image"])
            except Exception as exc:  # noqa: BLE001 - the model family has no such pipeline
                raise BackendRejected(f"backend {self.name!r} cannot edit images with this "
                                      "model", param="model", code="unsupported_model") from exc
            pipe.set_progress_bar_config(disable=True)
            self._pipes[kind] = pipe
        return self._pipes[kind]

    def _generate(self, call: GenerationCall, watch: _Watch | None = None
                  ) -> list[GeneratedImage]:
        pipe = self._pipe()
        size = self._size(call.size)
        args: dict[str, Any] = {"num_inference_steps": self._steps(call)}
        if size:
            args["width"], args["height"] = _rounded(size)
        if watch is not None and "callback_on_step_end" not in inspect.signature(
                pipe.__call__).parameters:
            log.warning("backend %s: %s shows no previews", self.name, type(pipe).__name__)
            watch = None
        return self._batches(pipe, call, args, size, watch)

    def _edit(self, call: GenerationCall, image_bytes: bytes,
              mask_bytes: bytes | None) -> list[GeneratedImage]:
        try:
            source = Image.open(io.BytesIO(image_bytes))
            source.load()
            mask = _edit_mask(Image.open(io.BytesIO(mask_bytes)) if mask_bytes else None, source)
        except (OSError, ValueError) as exc:
            raise BackendRejected(f"backend {self.name!r} cannot read the image or mask",
                                  param="image", code="invalid_image") from exc
        size = self._size(call.size) or source.size
        width, height = _rounded(size)
        args: dict[str, Any] = {"image": source.convert("RGB").resize((width, height)),
                                "strength": self.options.edit_strength,
                                "num_inference_steps": self._steps(call)}
        if mask is not None:
            args.update(mask_image=mask.resize((width, height)), width=width, height=height)
        pipe = self._pipe("inpaint" if mask is not None else "image2image")
        return self._batches(pipe, call, args, size)

    def _batches(self, pipe: Any, call: GenerationCall, args: dict[str, Any],
                 size: tuple[int, int] | None, watch: _Watch | None = None
                 ) -> list[GeneratedImage]:
        import torch

        opts = self.options
        seed = self._seed(call)
        if opts.guidance_scale is not None:
            args["guidance_scale"] = opts.guidance_scale
        made: list[Image.Image] = []
        try:
            for first in range(0, call.n, opts.max_batch):
                count = min(opts.max_batch, call.n - first)
                generators = None if seed is None else [
                    torch.Generator("cpu").manual_seed(seed + first + i) for i in range(count)]
                if watch is not None:
                    args["callback_on_step_end"] = watch.callback(first, count, size)
                made += pipe(prompt=call.prompt, num_images_per_prompt=count,
                             generator=generators, **args).images
        except GuardError:
            raise
        except Exception as exc:  # noqa: BLE001 - out of memory, a bad argument for this model
            log.exception("backend %s: pipeline failed", self.name)
            raise BackendError(f"backend {self.name!r} failed ({type(exc).__name__})") from exc
        return [_encode(image, size, call) for image in made]

    # --- request fields -------------------------------------------------------------------

    def _size(self, size: str | None) -> tuple[int, int] | None:
        if not size or size == "auto":
            return None
        width, _, height = size.partition("x")
        w, h = int(width), int(height)
        if not (_MULTIPLE <= w <= self.options.max_side and _MULTIPLE <= h <= self.options.max_side):
            raise BackendRejected(f"size {size} is outside {_MULTIPLE}..{self.options.max_side} "
                                  f"pixels a side for backend {self.name!r}", param="size",
                                  code="invalid_size")
        return w, h

    def _steps(self, call: GenerationCall) -> int:
        asked = call.extra.get("steps")
        if asked is None:
            asked = self.options.steps_by_quality.get(call.quality or "", self.options.steps)
        if not isinstance(asked, int) or not 1 <= asked <= self.options.max_steps:
            raise BackendRejected(f"steps must be an integer from 1 to {self.options.max_steps}",
                                  param="steps")
        return asked

    def _seed(self, call: GenerationCall) -> int | None:
        seed = call.extra.get("seed", self.options.seed)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                                 or not 0 <= seed < 2**63):
            raise BackendRejected("seed must be a non-negative integer", param="seed")
        return seed


class _Watch:
    """Previews of one generate call: made in the worker thread at the preview steps, shown to
    the handler on the event loop, whose answers the thread reads at later steps' ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_preview: PreviewHandler,
                 options: DiffusersOptions) -> None:
        self.loop = loop
        self.on_preview = on_preview
        self.steps = frozenset(options.preview_steps)
        self.decoder = options.preview_decoder
        self.shown: list[int] = []  # image index of each preview shown, in order
        self.verdicts: list[concurrent.futures.Future[PreviewAction]] = []
        self.halted = False  # set on the loop: the call was cancelled
        self.broken = False  # its latents did not decode: no more previews

    def stopped(self) -> set[int]:
        return {index for index, verdict in zip(self.shown, self.verdicts, strict=True)
                if verdict.done() and not verdict.cancelled() and verdict.exception() is None
                and verdict.result() == "stop"}

    def callback(self, first: int, count: int, size: tuple[int, int] | None
                 ) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
        """diffusers' `callback_on_step_end` for the batch of images first .. first+count-1."""
        def on_step_end(pipe: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            stopped = self.stopped()
            if self.halted or all(first + j in stopped for j in range(count)):
                pipe._interrupt = True  # diffusers' own way: the remaining steps are skipped
            elif i + 1 in self.steps and not self.broken:
                for j, picture in enumerate(self._decode(pipe, tensors["latents"])):
                    if first + j not in stopped:
                        self._show(Preview(first + j, i + 1, _preview(picture, size)))
            return tensors

        return on_step_end

    def _show(self, preview: Preview) -> None:
        self.shown.append(preview.index)
        self.verdicts.append(asyncio.run_coroutine_threadsafe(
            _ask(self.on_preview, preview), self.loop))

    def _decode(self, pipe: Any, latents: Any) -> list[Image.Image]:
        import torch

        try:
            if self.decoder == "approx" and latents.ndim == 4 and latents.shape[1] == 4:
                rgb = torch.einsum("bchw,cr->brhw", latents.float(),
                                   torch.tensor(_SD_LATENT_RGB, device=latents.device))
                pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
                return [Image.fromarray(p.cpu().numpy()) for p in pixels]
            vae = pipe.vae
            scaled = latents / vae.config.scaling_factor
            if getattr(vae.config, "shift_factor", None):
                scaled = scaled + vae.config.shift_factor
            decoded = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
            return list(pipe.image_processor.postprocess(decoded, output_type="pil"))
        except Exception as exc:  # noqa: BLE001 - packed latents, a VAE without these fields
            log.warning("previews off for this call: latents of shape %s do not decode (%s)",
                        tuple(getattr(latents, "shape", ())), type(exc).__name__)
            self.broken = True
            return []


async def _ask(on_preview: PreviewHandler, preview: Preview) -> PreviewAction:
    return await on_preview(preview)


# SD 1.x/2.x latents -> RGB in [-1, 1], one row per latent channel (the factors latent previews
# commonly use); a rough picture, enough for a judge to see what is being drawn.
_SD_LATENT_RGB = [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                  [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]


def _preview(picture: Image.Image, size: tuple[int, int] | None) -> GeneratedImage:
    if size and picture.size != size:
        picture = picture.resize(size, Image.Resampling.BILINEAR)
    out = io.BytesIO()
    picture.convert("RGB").save(out, format="PNG", compress_level=1)  # speed over size
    return GeneratedImage(data=out.getvalue(), media_type="image/png")


def _rounded(size: tuple[int, int]) -> tuple[int, int]:
    return tuple(max(_MULTIPLE, round(side / _MULTIPLE) * _MULTIPLE)  # type: ignore[return-value]
                 for side in size)


def _edit_mask(mask: Image.Image | None, source: Image.Image) -> Image.Image | None:
    """diffusers' mask (white = repaint) from OpenAI's (transparent = may change). With no mask,
    a source image with transparent areas is its own mask, as in OpenAI's API."""
    if mask is None:
        if source.mode not in ("RGBA", "LA") or source.getchannel("A").getextrema()[0] == 255:
            return None
        mask = source
    if mask.mode in ("RGBA", "LA", "PA") or (mask.mode == "P" and "transparency" in mask.info):
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a < 128 else 0)
    return mask.convert("L")


def _encode(image: Image.Image, size: tuple[int, int] | None,
            call: GenerationCall) -> GeneratedImage:
    if size and image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    fmt = _FORMATS.get(call.output_format or "png", "PNG")
    out = io.BytesIO()
    if fmt == "PNG":
        image.save(out, format=fmt)
    else:
        # OpenAI's output_compression defaults to 100 for its best output: it acts as quality.
        quality = 90 if call.output_compression is None else max(1, call.output_compression)
        image.save(out, format=fmt, quality=quality)
    return GeneratedImage(data=out.getvalue(), media_type=f"image/{fmt.lower()}")
