"""The GPU checks of issue 14, in one process, offline, on random-weight models made here.

    .venv/bin/python scripts/gpu_check.py [--size real|tiny] [--families sd15,sd21] [--steps 3]

Prints one ``RESULT <name> {json}`` line per check (``"ok": true/false``, or ``"skipped": why``):

- ``env``                      torch / CUDA / card, the precision ``auto`` picks
- ``library_step.<fam>.<preset>``  DynASyn steps (L_MD + L_M2A + L_ICA + L_AUG) per memory preset, as the Train
                               node runs them: the frozen model's targets precomputed first (its time and peak
                               reported apart), the frozen copy freed, then the steps: step time, peak memory
                               allocated / reserved next to the estimator's figures, host syncs per step (CUDA's
                               sync debug mode), losses finite
- ``grads.<fam>.<precision>``  one step's UNet + text-encoder gradients under bf16 / fp16 autocast vs fp32
- ``train_node.<fam>``         the Train node in-process in ComfyUI, then a KSampler on its MODEL; the input
                               model unchanged; GPU memory released once the node has returned
Without CUDA (``--size tiny``, the default there) the same code runs on the built-in tiny model and the
CUDA-only measurements print a RESULT line saying they were skipped. On one GPU the real-size run (SD 1.5
and SD 2.1 at 512 px) takes a few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
GIB = 2 ** 30


def result(name: str, **data) -> None:
    print("RESULT " + name + " " + json.dumps(data, default=str), flush=True)


def checked(name: str):
    """Run a check; an exception becomes ``ok: false`` with the error, and the next check still runs."""
    def wrap(fn):
        def run(*a, **k):
            try:
                fn(*a, **k)
            except Exception as e:  # noqa: BLE001
                label = ".".join([name] + [x.split(" ")[0] for x in a if isinstance(x, str)])
                result(label, ok=False, error=f"{type(e).__name__}: {e}",
                       trace=traceback.format_exc(limit=-3))
            finally:
                gc.collect()
                if CUDA:
                    torch.cuda.empty_cache()
        return run
    return wrap


# ---------------------------------------------------------------- models


def components(family: str, size: str, seed: int = 0):
    """Random-weight SD components: the real SD 1.5 / SD 2.1 (fp32 attention) architectures made directly on the
    device, or the tiny model."""
    from dynasyn.models import SDComponents, make_noise_scheduler

    if size == "tiny":
        from dynasyn.tiny import tiny_components
        return tiny_components(seed=seed, family="sd15" if family == "sd15" else "sd2",
                               prediction_type="epsilon" if family == "sd15" else "v_prediction")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from common import clip_sized_tokenizer
    from tests.support.sd_fixtures import SD15_TE, SD15_UNET, SD21_TE, SD21_UNET

    torch.manual_seed(seed)
    tok = clip_sized_tokenizer("sd15" if family == "sd15" else "sd2")
    with torch.device(DEV):
        unet = UNet2DConditionModel(**{**(SD15_UNET if family == "sd15" else SD21_UNET), "sample_size": 64})
        te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                          **{**(SD15_TE if family == "sd15" else SD21_TE), "num_hidden_layers":
                                             12 if family == "sd15" else 23}))
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    sched = make_noise_scheduler("epsilon" if family == "sd15" else "v_prediction")
    return SDComponents(unet.eval(), te.eval(), tok, vae.eval(), sched, family="sd15" if family == "sd15" else "sd2")


def scene(res: int):
    from common import augmented_pair, scene as bench_scene
    image, masks, nouns = bench_scene(res)
    return image, masks, nouns, augmented_pair(res)


@contextlib.contextmanager
def count_syncs():
    """Host-device synchronisations, as CUDA's sync debug mode reports them (one warning each)."""
    box = {"n": None}
    if not CUDA:
        yield box
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield box
        finally:
            torch.cuda.set_sync_debug_mode("default")
    box["n"] = sum("synchroniz" in str(w.message).lower() for w in caught)


def sync():
    if CUDA:
        torch.cuda.synchronize()


# ---------------------------------------------------------------- checks


def env(args) -> None:
    from dynasyn.devices import cuda_capability, resolve_mixed_precision

    cap = cuda_capability(DEV)
    result("env", ok=True, torch=torch.__version__, cuda=torch.version.cuda, device=str(DEV),
           card=torch.cuda.get_device_name(DEV) if CUDA else None, capability=cap,
           total_gib=torch.cuda.get_device_properties(DEV).total_memory / GIB if CUDA else None,
           auto_precision=resolve_mixed_precision("auto", DEV, cap)[0], size=args.size)


def library_step(family: str, preset: str, args) -> None:
    from dynasyn.memory import apply_preset, estimate, model_size
    from dynasyn.train import DynASynTrainer, TrainConfig

    name = f"library_step.{family}.{preset.split(' ')[0]}GB"
    res = 512 if args.size == "real" else 64
    image, masks, nouns, pair = scene(res)
    comps = components(family, args.size)
    size = model_size(comps.unet, comps.text_encoder, comps.vae)
    cfg = apply_preset(TrainConfig(mode="dynasyn", phase1_steps=0, phase2_steps=args.steps + 1, phase2_lr=1e-6,
                                   resolution=res, seed=0), preset)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    trainer = DynASynTrainer(comps, image, masks, nouns, cfg, augmented=[pair], device=DEV, log=lambda *_: None)
    made_peak = torch.cuda.max_memory_allocated(DEV) / GIB if CUDA else None
    assert cfg.precompute_targets  # as the node trains: every step's frozen-model targets, then the copy freed
    sync()
    t0 = time.perf_counter()
    trainer.precompute_targets()
    sync()
    precompute_s = time.perf_counter() - t0
    precompute_peak = torch.cuda.max_memory_allocated(DEV) / GIB if CUDA else None
    if trainer.frozen is not None or len(trainer.targets) != args.steps + 1:
        raise RuntimeError("the targets were not precomputed for every step, or the frozen copy was kept")
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    trainer._setup_phase(2)
    times, syncs, losses = [], [], []
    for _ in range(args.steps + 1):  # the first step allocates the optimizer state and warms the kernels
        sync()
        t0 = time.perf_counter()
        with count_syncs() as box:
            entry = trainer.training_step()
        sync()
        times.append(time.perf_counter() - t0)
        syncs.append(box["n"])
        losses.append(entry.loss)
    est = estimate(size, cfg, device_type=DEV.type, with_aug=True, precision=trainer.precision)
    peak = torch.cuda.max_memory_allocated(DEV) / GIB if CUDA else None
    reserved = torch.cuda.max_memory_reserved(DEV) / GIB if CUDA else None
    result(name, ok=all(map(lambda v: v == v and abs(v) < float("inf"), losses)), preset=preset, family=family,
           resolution=res, precision=trainer.precision, precompute_s=precompute_s,
           precompute_per_step_s=precompute_s / (args.steps + 1), step_s=statistics.median(times[1:]),
           first_step_s=times[0], syncs_per_step=syncs[1:], trainer_made_peak_allocated_gib=made_peak,
           precompute_peak_allocated_gib=precompute_peak, peak_allocated_gib=peak, peak_reserved_gib=reserved,
           estimate_gib=est.gib, estimate_training_gib=est.training / GIB,
           estimate_precompute_gib=est.precompute_total / GIB,
           estimate_parts_gib={k: round(v / GIB, 3) for k, v in est.parts.items()},
           estimate_precompute_parts_gib={k: round(v / GIB, 3) for k, v in (est.precompute or {}).items()}, losses=losses)
    if not CUDA:
        result(name + ".cuda_memory_and_syncs", skipped="no CUDA device: peak VRAM and sync counts need one")


def grads(family: str, args) -> None:
    from dynasyn.train import DynASynTrainer, TrainConfig

    res = 512 if args.size == "real" else 64
    image, masks, nouns, _ = scene(res)
    got = {}
    for precision in ("no", "bf16", "fp16"):
        comps = components(family, args.size, seed=1)
        cfg = TrainConfig(mode="break_a_scene", phase1_steps=0, phase2_steps=1, resolution=res, seed=0,
                          max_grad_norm=0.0, mixed_precision=precision)
        t = DynASynTrainer(comps, image, masks, nouns, cfg, device=DEV, log=lambda *_: None)
        t._setup_phase(2)
        if t.scaler is not None:
            t.scaler = torch.amp.GradScaler(DEV.type, init_scale=2.0 ** 12)
        t.optimizer.step = lambda: None  # keep the gradients, change no weight
        t.training_step()
        g = [p.grad.detach().float().reshape(-1) for p in t.params if p.grad is not None]
        got[precision] = torch.cat(g) if g else None
        del t, comps
        gc.collect()
    ref = got.pop("no")
    for precision, g in got.items():
        if g is None or ref is None:
            result(f"grads.{family}.{precision}", ok=False, error="no gradients (skipped step: overflow?)")
            continue
        cos = torch.nn.functional.cosine_similarity(g, ref, dim=0).item()
        rel = ((g - ref).norm() / ref.norm()).item()
        result(f"grads.{family}.{precision}", ok=cos > 0.99 and rel < 0.15, cosine_vs_fp32=cos, relative_error=rel,
               finite=bool(torch.isfinite(g).all()))


def setup_comfy_on_device():
    """ComfyUI in-process, on the GPU when there is one (the test helper forces --cpu)."""
    from tests.support import comfy_env

    if not comfy_env._ready:
        comfy = comfy_env.COMFY_DIR
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
        sys.path.insert(0, str(comfy))
        sys.modules.pop("nodes", None)
        argv, sys.argv = sys.argv, ["main.py"] + ([] if CUDA else ["--cpu"])
        try:
            import comfy.options
            comfy.options.enable_args_parsing()
            import comfy.cli_args  # noqa: F401
            import comfy.model_management  # noqa: F401
        finally:
            sys.argv = argv
        comfy_env._ready = True
    return comfy_env.load_pack()


def train_node(family: str, args) -> None:
    pack = setup_comfy_on_device()
    import comfy.model_management as mm
    import comfy.sd
    import folder_paths
    import nodes as comfy_nodes

    out = Path(tempfile.mkdtemp(prefix="dynasyn_gpu_check_"))
    folder_paths.set_output_directory(str(out / "output"))
    for kind in ("embeddings", "checkpoints"):
        (out / kind).mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(kind, str(out / kind), is_default=True)
    bridge = pack.nodes.bridge
    if args.size == "real":
        from tests.support.sd_fixtures import random_checkpoint
        path = random_checkpoint("sd15" if family == "sd15" else "sd21v")
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True, embedding_directory=str(out / "embeddings"))[:4]
        res = 512 if family == "sd15" else 768
    else:
        from transformers import CLIPTokenizer

        from dynasyn.tiny import tiny_components
        tok = CLIPTokenizer.from_pretrained(str(bridge.TOKENIZER_DIR), model_max_length=77, local_files_only=True)
        with torch.inference_mode(False):
            model, clip, vae = bridge.tiny_native(tiny_components(seed=0, tokenizer=tok), embedding_directory=str(out / "embeddings"))
        res = 64
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    base_before = {k: v.detach().float().sum().item() for k, v in list(model.model.diffusion_model.state_dict().items())[:8]}
    allocated_before = torch.cuda.memory_allocated(DEV) if CUDA else None
    image, masks, nouns, _ = scene(res)
    node = pack.nodes.train_node.DynASynTrain()
    req = node.INPUT_TYPES()["required"]
    kw = {k: v[1]["default"] for k, v in req.items() if len(v) > 1 and isinstance(v[1], dict) and "default" in v[1]}
    kw.update(model=model, clip=clip, vae=vae, image=image[None], masks=torch.stack(masks), class_nouns=", ".join(nouns),
              phase1_steps=2, phase2_steps=2, resolution=res, save_as="embeddings", resume=False, preview_every=0,
              force_retrain=True,
              run_name=f"gpucheck_{family}", unique_id="1")
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.inference_mode():  # as ComfyUI runs a node
        out_node = node.train(**kw)
    train_s = time.perf_counter() - t0
    trained_model, trained_clip, prompt = out_node["result"][:3]
    peak = torch.cuda.max_memory_allocated(DEV) / GIB if CUDA else None
    with torch.inference_mode():
        pos = comfy_nodes.CLIPTextEncode().encode(trained_clip, prompt)[0]
        neg = comfy_nodes.CLIPTextEncode().encode(trained_clip, "")[0]
        latent = comfy_nodes.EmptyLatentImage().generate(res, res, 1)[0]
        t0 = time.perf_counter()
        samples = comfy_nodes.common_ksampler(trained_model, 0, 2, 7.0, "euler", "normal", pos, neg, latent)[0]
        sample_s = time.perf_counter() - t0
    finite = bool(torch.isfinite(samples["samples"]).all())
    del out_node, trained_model, trained_clip, samples, pos, neg
    mm.unload_all_models()  # ComfyUI patches the shared weights while a clone is loaded and restores them here
    gc.collect()
    mm.soft_empty_cache()
    base_after = {k: v.detach().float().sum().item() for k, v in list(model.model.diffusion_model.state_dict().items())[:8]}
    result(f"train_node.{family}", ok=finite and base_before == base_after, resolution=res, train_s=train_s,
           sample_s=sample_s, peak_allocated_gib=peak, base_model_unchanged=base_before == base_after,
           samples_finite=finite, prompt=prompt)
    if CUDA:
        left = (torch.cuda.memory_allocated(DEV) - allocated_before) / 2 ** 20
        result(f"memory_released.{family}", ok=left < 64, allocated_left_mib=left)
    else:
        result(f"memory_released.{family}", skipped="no CUDA device")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=("real", "tiny"), default="real" if CUDA else "tiny")
    ap.add_argument("--families", default="sd15,sd21")
    ap.add_argument("--presets", default="24 GB (paper),12 GB,8 GB")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma-separated: library,grads,node")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    started = time.time()
    checked("env")(env)(args)
    families = [f for f in args.families.split(",") if f]
    if "library" not in skip:
        for family in families:
            for preset in args.presets.split(","):
                checked("library_step")(library_step)(family, preset, args)
    if "grads" not in skip:
        for family in families:
            checked("grads")(grads)(family, args)
    if "node" not in skip:
        for family in families:
            checked("train_node")(train_node)(family, args)
    result("done", ok=True, seconds=time.time() - started)


if __name__ == "__main__":
    main()
