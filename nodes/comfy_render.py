"""The augmentation stage's sampling on the native MODEL with ComfyUI's own sampler.

``ComfyRenderer`` is the ComfyUI side of ``dynasyn.augment.Renderer``: drafts (txt2img, batched,
with the subjects' cross-attention captured by attn2 replace patches), inpainting (ComfyUI's
``noise_mask``, the known pixels put back exactly) and GSA (the sigmas of the library's start
timesteps; without SAM, with the subjects' cross-attention captured to re-segment its output).
Everything else, the method's bookkeeping, stays in ``dynasyn.augment``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy.ldm.modules.attention import optimized_attention

from ..dynasyn.drafts import Draft
from ..dynasyn.errors import DynASynError
from ..dynasyn.gsa import PAPER_START_T, GSAConfig, make_scheduler, start_timesteps
from ..dynasyn.subjects import phrase_positions
from ..dynasyn.attention import capture_level, token_maps

CAPTURE_SIDE = 16  # the paper's 16x16 cross-attention maps (SD at 512 px; small UNets at their training size)


def gsa_sigmas(model, strength: float, steps: int, paper_exact: bool = False) -> tuple[torch.Tensor, int]:
    """Sigmas of the GSA timesteps for this model (then 0), and the start timestep as the model reads its first sigma."""
    cfg = GSAConfig(strength=strength, steps=steps, paper_exact=paper_exact)
    steps, strength = (1000, PAPER_START_T / 1000) if paper_exact else (steps, strength)
    timesteps = start_timesteps(make_scheduler(cfg, "epsilon"), steps, strength)
    ms = model.get_model_object("model_sampling")
    sigmas = torch.cat([ms.sigma(timesteps.float()).float().cpu(), torch.zeros(1)])
    return sigmas, int(round(float(ms.timestep(sigmas[:1]))))


def comfy_gsa(model, positive, negative, vae, image: torch.Tensor, strength: float, steps: int, sampler_name: str,
              cfg: float, seed: int, paper_exact: bool = False, callback=None) -> tuple[torch.Tensor, int, int]:
    """GSA of IMAGE ``[B, H, W, 3]``: returns the images, the start timestep and the number of steps run."""
    sigmas, start_t = gsa_sigmas(model, strength, steps, paper_exact)
    sampler = comfy.samplers.sampler_object("ddpm" if paper_exact else sampler_name)
    latent = comfy.sample.fix_empty_latent_channels(model, vae.encode(image[..., :3]))
    noise = comfy.sample.prepare_noise(latent, seed)
    if callback is None:
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    samples = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent, callback=callback,
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return decode(vae, samples), start_t, len(sigmas) - 1


def decode(vae, samples: torch.Tensor) -> torch.Tensor:
    out = vae.decode(samples)
    return out.reshape(-1, *out.shape[-3:]).float().cpu().clamp(0, 1)


def native_capture_level(model) -> int:
    """The UNet level whose attn2 layers are captured: the same blocks as the library's ``capture_layers``
    (SD: input blocks 7, 8 and output blocks 3, 4, 5 = down_blocks.2 / up_blocks.1, at any size)."""
    cfg = model.model.model_config.unet_config
    return capture_level(len(cfg["channel_mult"]), int(cfg.get("image_size") or 32), CAPTURE_SIDE)


def _level_size(n: int, level: int) -> int:
    for _ in range(level):  # ComfyUI's stride-2 downsampling (padding 1): ceil
        n = (n + 1) // 2
    return n


class NativeAttentionCapture:
    """An attn2 replace patch: the normal attention output, and for the conditional samples of the
    capture level's layers (not the middle block) the head-averaged probabilities, summed over calls.
    ``with_attention_capture`` sets ``level`` from the model."""

    def __init__(self, level: int | None = None):
        self.level = level
        self.total: torch.Tensor | None = None   # [B, HW, T]
        self.calls = 0
        self.blocks: set[tuple] = set()          # (input|output, index) of the captured layers

    def __call__(self, q, k, v, extra_options, attend=None):
        heads = extra_options["n_heads"]
        if attend is not None:  # another pack's attn2 replacement computes the output; the capture only reads q, k
            out = attend(q, k, v, extra_options)
        else:
            out = optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"))  # SD 2.x: fp32
        H, W = extra_options["original_shape"][-2:]
        if self.level is None:
            raise DynASynError("NativeAttentionCapture needs its level: install it with with_attention_capture.")
        if extra_options["block"][0] == "middle" or q.shape[1] != _level_size(H, self.level) * _level_size(W, self.level):
            return out
        flags = extra_options["cond_or_uncond"]  # 0 = cond, 1 = uncond; one chunk each
        chunk = q.shape[0] // len(flags)
        rows = [i * chunk + j for i, f in enumerate(flags) if f == 0 for j in range(chunk)]
        if not rows:
            return out
        b, n, inner = q[rows].shape
        d = inner // heads
        qh = q[rows].float().view(b, n, heads, d).transpose(1, 2)                 # [b, heads, HW, d]
        kh = k[rows].float().view(b, k.shape[1], heads, d).transpose(1, 2)        # [b, heads, T, d]
        probs = torch.softmax(qh @ kh.transpose(-1, -2) * d ** -0.5, dim=-1).mean(dim=1)  # [b, HW, T], kept on the device
        self.total = probs if self.total is None else self.total + probs
        self.calls += 1
        self.blocks.add(tuple(extra_options["block"][:2]))
        return out

    def maps(self, height: int, width: int) -> torch.Tensor:
        """[B, h, w, T] (the latent ``height`` x ``width`` at the capture level): the mean over every captured layer and step."""
        if self.total is None:
            raise DynASynError(f"No cross-attention layer of the capture level ran for {width}x{height} latents; "
                               "the drafts need the UNet's attention maps (SD 1.x / 2.x at 512 or 768 px).")
        mean = self.total.cpu() / self.calls  # one copy to the host per draft, not one per layer and step
        return mean.reshape(mean.shape[0], _level_size(height, self.level), _level_size(width, self.level), mean.shape[-1])


class ChainedCapture:
    """``capture`` in front of an attn2 replacement that was already on the MODEL (IPAdapter, attention couple...):
    that one still computes the output, so both packs work together (ComfyUI keeps one replacement per block)."""

    def __init__(self, capture: NativeAttentionCapture, previous):
        self.capture, self.previous = capture, previous

    def __call__(self, q, k, v, extra_options):
        return self.capture(q, k, v, extra_options, attend=self.previous)


def with_attention_capture(model, capture: NativeAttentionCapture):
    """A clone of MODEL with ``capture`` on every block that has cross-attention (it keeps the capture level's),
    chained onto any attn2 replacement the MODEL already had there, per block or per transformer. attn2 input
    patches (``set_model_attn2_patch``) are separate in ComfyUI and keep running as they are."""
    from comfy.ldm.modules.attention import SpatialTransformer

    capture.level = native_capture_level(model)
    patched = model.clone()
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    unet = model.model.diffusion_model
    blocks = [("input", i, b) for i, b in enumerate(unet.input_blocks)] + [("output", i, b) for i, b in enumerate(unet.output_blocks)]
    for name, i, block in blocks:
        if any(isinstance(layer, SpatialTransformer) for layer in block):
            # ComfyUI prefers a (block, id, transformer) replacement over a (block, id) one: wrap those as well
            for key, previous in list(existing.items()):
                if len(key) == 3 and key[:2] == (name, i):
                    patched.set_model_attn2_replace(ChainedCapture(capture, previous), name, i, key[2])
            previous = existing.get((name, i))
            patched.set_model_attn2_replace(capture if previous is None else ChainedCapture(capture, previous), name, i)
    return patched


def _ids(clip, text: str) -> list[int]:
    tokens = clip.tokenize(text)
    chunks = next(iter(tokens.values()))  # one encoder for SD 1.x ("l") and 2.x ("h")
    return [int(t[0]) for chunk in chunks for t in chunk]


def description_positions(clip, prompt: str, phrases: Sequence[str], before: Sequence[str] | None = None) -> list[list[int]]:
    """Token positions of each phrase in ``prompt`` as ComfyUI's own tokenizer writes it; ``before``: the text of
    ``prompt`` before each phrase (``PromptTemplate.before_markers``), where its search starts (not at a prop)."""
    empty = _ids(clip, "")  # [start, end, pad...]
    end, pad = empty[1], empty[-1]

    def words(text: str) -> list[int]:  # the text's ids as they start the prompt's: chunk starts kept, end and padding cut
        ids = _ids(clip, text)
        while len(ids) > 1 and ids[-1] in (end, pad):
            ids.pop()
        return ids

    subs = [words(p)[1:] for p in phrases]
    starts = None if before is None else [len(words(b)) for b in before]  # where each phrase can begin
    return phrase_positions(_ids(clip, prompt), subs, phrases, prompt, starts=starts)


def _to_bchw_mask(mask: torch.Tensor) -> torch.Tensor:
    return mask.float().reshape(1, 1, *mask.shape[-2:])


class ComfyRenderer:
    """Drafts, inpainting and GSA on the native MODEL/CLIP/VAE (``dynasyn.augment.Renderer``).

    ``step(done_evaluations, preview)`` is called after every sampler step, for one progress bar
    over the whole stage.
    """

    def __init__(self, model, clip, vae, cfg, sampler_name: str = "euler", scheduler: str = "normal",
                 step: Callable[[int, tuple | None], None] | None = None):
        self.model, self.clip, self.vae, self.cfg = model, clip, vae, cfg
        self.sampler_name, self.scheduler = sampler_name, scheduler
        self.step = step
        self.evaluations = 0
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        self.negative = self.encode(cfg.gsa.negative_prompt)
        self.factor = int(vae.spacial_compression_encode()) if hasattr(vae, "spacial_compression_encode") else vae.downscale_ratio

    def encode(self, text: str):
        return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))

    def _callback(self):
        base = self.evaluations

        def callback(step, x0, x, total):
            self.evaluations = base + step + 1
            if self.step:
                preview = self.previewer.decode_latent_to_preview_image("JPEG", x0[-1:]) if self.previewer else None
                self.step(self.evaluations, preview)
        return callback

    def drafts(self, templates, descriptions, seeds, size):
        prompts = [t.render(descriptions) for t in templates]
        conds = [self.encode(p) for p in prompts]
        # one conditioning whose batch is the prompts (ComfyUI repeats a batch-1 negative)
        tensor = torch.cat([c[0][0] for c in conds])
        extra = dict(conds[0][0][1])
        if extra.get("pooled_output") is not None:
            extra["pooled_output"] = torch.cat([c[0][1]["pooled_output"] for c in conds])
        positive = [[tensor, extra]]
        h, w = size[0] // self.factor, size[1] // self.factor
        latent = comfy.sample.fix_empty_latent_channels(self.model, torch.zeros(len(prompts), 4, h, w))
        # prompt k's starting noise depends only on its seed (deterministic samplers draw the same
        # image in any batch; ancestral ones add batch noise from the first seed)
        noise = torch.cat([comfy.sample.prepare_noise(latent[i:i + 1], s) for i, s in enumerate(seeds)])
        capture = NativeAttentionCapture()
        samples = comfy.sample.sample(with_attention_capture(self.model, capture), noise, self.cfg.draft_steps,
                                      self.cfg.guidance_scale, self.sampler_name, self.scheduler, positive, self.negative,
                                      latent, denoise=1.0, callback=self._callback(),
                                      disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seeds[0])
        images = decode(self.vae, samples)
        maps = capture.maps(h, w)
        out = []
        for i, (template, prompt) in enumerate(zip(templates, prompts)):
            phrases, before = [descriptions[s] for s in template.subjects], template.before_markers(descriptions)
            positions = description_positions(self.clip, prompt, phrases, before)
            out.append(Draft(images[i], template, prompt, token_maps(maps[i], positions), phrases, before))
        return out

    def inpaint(self, image, mask, prompt, seed):
        latent = comfy.sample.fix_empty_latent_channels(self.model, self.vae.encode(image[None, ..., :3]))
        noise = comfy.sample.prepare_noise(latent, seed)
        samples = comfy.sample.sample(self.model, noise, self.cfg.inpaint_steps, self.cfg.guidance_scale, self.sampler_name,
                                      self.scheduler, self.encode(prompt), self.negative, latent, denoise=1.0,
                                      noise_mask=_to_bchw_mask(mask), callback=self._callback(),
                                      disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = decode(self.vae, samples)[0]
        if out.shape[:2] != image.shape[:2]:
            out = torch.nn.functional.interpolate(out.permute(2, 0, 1)[None], size=image.shape[:2], mode="bilinear",
                                                  align_corners=False)[0].permute(1, 2, 0)
        # the VAE decoder mixes globally: the known pixels go back exactly
        keep = (mask < 0.5)[..., None]
        return torch.where(keep, image.float().cpu(), out), self.cfg.inpaint_steps

    def gsa(self, image, prompt, seed, phrases=None, before=None):
        g = self.cfg.gsa
        capture = NativeAttentionCapture() if phrases is not None else None
        model = self.model if capture is None else with_attention_capture(self.model, capture)
        images, start_t, steps = comfy_gsa(model, self.encode(prompt), self.negative, self.vae, image[None],
                                           g.strength, g.steps, g.sampler, self.cfg.guidance_scale, seed, g.paper_exact,
                                           callback=self._callback())
        info = {"start_timestep": start_t, "unet_evaluations": steps}
        if capture is not None:  # each phrase's cross-attention over the pass: re-segments the output without SAM
            maps = capture.maps(image.shape[0] // self.factor, image.shape[1] // self.factor)[0]
            info["attention"] = token_maps(maps, description_positions(self.clip, prompt, phrases, before))
        return images[0], info

    def planned_evaluations(self, prompts: int) -> int:
        """UNet evaluations for ``prompts`` prompts (inpainting counted as if every draft needs it)."""
        g = self.cfg.gsa
        gsa_steps = len(gsa_sigmas(self.model, g.strength, g.steps, g.paper_exact)[0]) - 1
        return prompts * (self.cfg.draft_steps + self.cfg.inpaint_steps + gsa_steps)
