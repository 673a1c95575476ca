"""The GPU code paths, checked on a CPU: device placement, precision, checkpointing, syncs, memory.

No GPU is needed: device mixing is caught by running the step on the ``meta`` device (any tensor left
on the CPU meets a meta tensor and torch refuses, exactly as it refuses a CPU tensor meeting a CUDA one).
"""

import pytest
import torch

from dynasyn.tiny import tiny_components
from dynasyn.train import MODES, DynASynTrainer, TrainConfig
from tests.support.scene import tensor_aug_pairs, tensor_scene as scene


class Reached(Exception):
    """Raised with the loss once the step has computed it (nothing after it can run on ``meta``)."""


def aug_pairs(n=1):
    return tensor_aug_pairs(n)


def step_until_loss(t: DynASynTrainer) -> torch.Tensor:
    def stop(value):
        raise Reached(value)

    t.dist.mean = stop  # the step's first use of the loss, after every term is computed
    with pytest.raises(Reached) as hit:
        t.training_step()
    return hit.value.args[0]


def meta_trainer(mode, **kw):
    image, masks, nouns = scene()
    config = TrainConfig(mode=mode, phase1_steps=1, phase2_steps=1, resolution=64, num_class_images=2, **kw)
    return DynASynTrainer(tiny_components(seed=0), image, masks, nouns, config, augmented=aug_pairs(), device="meta",
                          log=lambda *_: None)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_tensor_of_the_step_is_on_the_trainers_device(mode, monkeypatch):
    """The trainable and frozen models live on ``meta``: a tensor left on the CPU (reference masks, noise,
    pseudo-masks, cached encodings, timesteps, class images) makes torch refuse the op, as CUDA would at step 1.
    Class images are pictures on the host by design (a meta model cannot draw one), so they come from the CPU
    here; encoding them and the prior term still run on the trainer's device."""
    import dynasyn.prior

    monkeypatch.setattr(dynasyn.prior, "generate_class_image", lambda comps, encode, prompt, size, *a: torch.rand(size, size, 3))
    t = meta_trainer(mode)
    for phase in MODES[mode][1]:
        t._setup_phase(phase)
        loss = step_until_loss(t)
        assert loss.device.type == "meta"
    assert t.ref_masks.device.type == "meta"


# ---------------------------------------------------------------- precision


def test_mixed_precision_decision():
    from dynasyn.devices import resolve_mixed_precision as choose
    from dynasyn.errors import DynASynError

    cuda = torch.device("cuda")
    assert choose("auto", cuda, (8, 0)) == ("bf16", None)            # Ampere and newer: native bf16
    assert choose("auto", cuda, (9, 0))[0] == "bf16"
    prec, note = choose("auto", cuda, (7, 5))                         # Turing: bf16 emulated -> fp16 + scaler
    assert prec == "fp16" and "no native bf16" in note
    assert choose("auto", cuda, (7, 0), fused_backward_step=True)[0] == "no"  # fp16 needs a scaler, fused can't
    assert choose("auto", "cpu") == ("no", None) and choose("auto", "mps") == ("no", None)
    assert "emulates bf16" in choose("bf16", cuda, (6, 1))[1]
    assert choose("fp16", cuda, (8, 6)) == ("fp16", None)
    with pytest.raises(DynASynError, match="fused_backward_step"):
        choose("fp16", cuda, (8, 6), fused_backward_step=True)
    with pytest.raises(DynASynError, match="Unknown mixed_precision"):
        TrainConfig(mixed_precision="fp32")
    assert TrainConfig().mixed_precision == "auto"


def cpu_trainer(mode="break_a_scene", augmented=(), **kw):
    image, masks, nouns = scene()
    config = TrainConfig(**{**dict(mode=mode, phase1_steps=1, phase2_steps=2, resolution=64, seed=0,
                                  prior_preservation=False), **kw})  # prior preservation: its own tests
    return DynASynTrainer(tiny_components(seed=0), image, masks, nouns, config, augmented=augmented, device="cpu",
                          log=lambda *_: None)


def unet_weights(t):
    return {k: v.clone() for k, v in t.c.unet.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_fp16_overflow_skips_the_step_and_lowers_the_scale(optimizer):
    """fp16 trains with torch.amp.GradScaler: an overflow skips that step (weights untouched, scale halved)
    and training goes on, instead of stopping the run (Adafactor too: the scaler finds its gradients)."""
    t = cpu_trainer(mixed_precision="fp16", phase2_lr=1e-3, optimizer=optimizer)
    t._setup_phase(2)
    assert isinstance(t.scaler, torch.amp.GradScaler)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100)  # any real gradient overflows in fp16
    before = unet_weights(t)
    entry = t.training_step()                                       # no NonFiniteLoss
    assert entry.step == 1 and t.skipped_steps == 1
    assert all(torch.equal(before[k], v) for k, v in t.c.unet.state_dict().items())
    assert t.scaler.get_scale() == 2.0 ** 99
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    t.training_step()
    assert any(not torch.equal(before[k], v) for k, v in t.c.unet.state_dict().items())
    assert cpu_trainer(mixed_precision="bf16").scaler is None


# ---------------------------------------------------------------- gradient checkpointing


def test_gradient_checkpointing_is_non_reentrant_on_both_transformers_apis():
    from dynasyn.devices import enable_gradient_checkpointing

    calls = []

    class UNet:
        def enable_gradient_checkpointing(self, gradient_checkpointing_func=None):
            calls.append(("unet", gradient_checkpointing_func.keywords))

    class TE4:  # transformers 4.35+: gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)
        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(("te4", gradient_checkpointing_kwargs))

    class TE5(TE4):  # transformers 5: activation_checkpointing_enable (the old name is a deprecated alias)
        def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None):
            calls.append(("te5", activation_checkpointing_kwargs))

    enable_gradient_checkpointing(UNet(), TE4())
    enable_gradient_checkpointing(UNet(), TE5())
    assert calls == [("unet", {"use_reentrant": False}), ("te4", {"use_reentrant": False}),
                     ("unet", {"use_reentrant": False}), ("te5", {"use_reentrant": False})]


@pytest.mark.parametrize("phase", [1, 2])
def test_gradient_checkpointing_gives_the_same_gradients_in_both_phases(phase):
    """Honoured in phase 1 too, and non-reentrant: the captured attention maps keep their graph, so L_M2A's
    gradient survives checkpointing (the reentrant kind would drop it silently)."""
    grads = []
    for ckpt in (False, True):
        t = cpu_trainer(gradient_checkpointing=ckpt, max_grad_norm=0.0)
        t._setup_phase(phase)
        assert t.c.unet.is_gradient_checkpointing == ckpt
        t.optimizer.step = lambda: None  # keep the gradients, change nothing
        t.training_step()
        grads.append({i: p.grad.clone() for i, p in enumerate(t.params) if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for i in grads[0]:
        torch.testing.assert_close(grads[1][i], grads[0][i], rtol=1e-4, atol=1e-7)


def test_fused_backward_step_with_checkpointing_steps_each_tensor_once():
    from dynasyn.optim import FusedBackwardOptimizer

    t = cpu_trainer(mode="dynasyn", gradient_checkpointing=True, fused_backward_step=True, optimizer="adafactor",
                    augmented=aug_pairs())
    t._setup_phase(2)
    counts = {}
    real = FusedBackwardOptimizer._step_unless

    def counted(opt, p, skip):
        counts[id(p)] = counts.get(id(p), 0) + 1
        return real(opt, p, skip)

    t.optimizer._step_unless = counted
    t.training_step()
    assert counts and max(counts.values()) == 1
    te_ids = {id(p) for p in t.c.text_encoder.parameters()}
    assert te_ids & counts.keys()  # the text encoder was trained through the checkpointed blocks


# ---------------------------------------------------------------- host syncs


SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize("fused", [False, True])
def test_one_host_sync_per_step(monkeypatch, fused):
    """The step reads the device once: loss, terms and the gradient check together (per-term .item(), a
    finiteness check per tensor or Python indexing with tensors would each add syncs on CUDA)."""
    import sys
    from pathlib import Path

    import dynasyn

    ours = str(Path(dynasyn.__file__).parent)
    seen = []
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, _real=real, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(ours):
                seen.append((_name, caller, sys._getframe(1).f_lineno))
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    t = cpu_trainer(mode="dynasyn", fused_backward_step=fused, optimizer="adamw", augmented=aug_pairs())
    for phase in (1, 2):
        t._setup_phase(phase)
        seen.clear()
        t.training_step()
        assert len(seen) == 1, seen


def test_fused_backward_skips_non_finite_tensors_on_the_device():
    """A non-finite gradient skips that tensor's update without reading it on the host: the fused AdamW kernel
    gets the flag as found_inf; other optimizers' updates are undone with torch.where."""
    from dynasyn.optim import FusedBackwardOptimizer

    for optimizer, fused, resumed_from in (("adamw", True, None), ("adamw", False, None), ("adafactor", None, None),
                                           ("adamw", None, False)):
        a = torch.nn.Parameter(torch.tensor([[0.0, 1.0], [4.0, 9.0]]))  # sqrt'(0) = inf: finite loss, inf gradient
        opt = FusedBackwardOptimizer([a], 1e-2, TrainConfig(optimizer=optimizer), fused=fused)
        if resumed_from is not None:  # a state saved by an unfused AdamW: its groups say fused=False from now on
            old = FusedBackwardOptimizer([torch.nn.Parameter(a.detach().clone())], 1e-2, TrainConfig(), fused=resumed_from)
            opt.load_state_dict(old.state_dict())
            assert not opt.optimizers[0].param_groups[0]["fused"]
        loss = a.sqrt().sum()
        opt.begin(loss)
        loss.backward()
        assert bool(opt.found_inf)
        assert torch.equal(a.detach(), torch.tensor([[0.0, 1.0], [4.0, 9.0]])), optimizer
        state = opt.optimizers[0].state[a]
        assert all(torch.isfinite(v).all() and not v.any() for v in state.values() if torch.is_tensor(v) and v.ndim), state
        opt.zero_grad()
        loss = (a * a).sum()
        opt.begin(loss)
        loss.backward()
        assert not bool(opt.found_inf)
        assert not torch.equal(a.detach(), torch.tensor([[0.0, 1.0], [4.0, 9.0]])), optimizer
        opt.remove()


def test_out_of_memory_on_older_torch_is_caught(monkeypatch):
    """torch < 2.5 has no torch.OutOfMemoryError: CUDA raises torch.cuda.OutOfMemoryError."""
    from dynasyn.devices import OOM_ERRORS
    from dynasyn.errors import DynASynError

    assert torch.cuda.OutOfMemoryError in OOM_ERRORS
    t = cpu_trainer()

    def oom():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    t.training_step = oom
    with pytest.raises(DynASynError, match="Out of memory at step 1"):
        t.train()


# ---------------------------------------------------------------- attention precision


@pytest.mark.parametrize("upcast", [True, False])
def test_captured_attention_honours_fp32_attention_under_autocast(upcast):
    """SD 2.x asks for fp32 attention (ComfyUI's attn_precision, diffusers' upcast_attention): autocast would run
    the capture processor's score product in bf16/fp16 anyway; the scores must stay fp32."""
    from diffusers.models.attention_processor import Attention

    from dynasyn.attention import AttentionStore, CaptureAttnProcessor

    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=2, dim_head=16, upcast_attention=upcast)
    store = AttentionStore()
    attn.set_processor(CaptureAttnProcessor(store, "layer"))
    x, ctx = torch.randn(1, 16, 32), torch.randn(1, 7, 16)
    store.enabled = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x, encoder_hidden_states=ctx)
    assert store.maps["layer"].dtype == (torch.float32 if upcast else torch.bfloat16)


def test_resume_loads_onto_the_cpu_first(tmp_path, monkeypatch):
    """A state saved on a GPU loads on any machine: torch.load maps it to the CPU, then tensors move to the device."""
    t = cpu_trainer()
    t._setup_phase(1)
    t.save_state(tmp_path / "state")
    seen = []
    real = torch.load

    def load(*a, **k):
        seen.append(k.get("map_location"))
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", load)
    cpu_trainer().load_state(tmp_path / "state")
    assert seen == ["cpu"]


_HOLES = """
import sys, torch
from dynasyn.devices import release_freed_host_memory
def rss():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')) / 1024
if sys.argv[1] == 'on':
    assert release_freed_host_memory()
warm = torch.ones(4 << 20); del warm  # a freed 16 MB block: glibc's sliding threshold rises past 4 MB
keep, holes = [], []
for i in range(64):  # 4 MB blocks in turns: the heap's holes once every other one is freed
    (keep if i % 2 else holes).append(torch.ones(1 << 20))
before = rss()
del holes
print(before - rss())
"""


@pytest.mark.parametrize("mode", ["on", "off"])
def test_released_host_memory_goes_back_to_the_os(mode):
    """A fresh process each (the setting is process-wide): with it, freeing every other 4 MB block returns
    their 128 MB; glibc's default keeps such holes in the heap."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _HOLES, mode], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    returned_mb = float(r.stdout.split()[-1])
    if mode == "on":
        assert returned_mb > 100, returned_mb
    else:
        assert returned_mb < 30, returned_mb


def test_adamw_is_fused_on_the_cpu_where_torch_has_the_kernel(monkeypatch):
    """torch >= 2.4 has a fused CPU AdamW (a quarter of the step time); older torch refuses fused=True for CPU
    tensors when the optimizer is built, and the trainer then steps unfused instead of failing."""
    from dynasyn import optim

    w = [torch.nn.Parameter(torch.ones(3))]
    optim.fused_adamw_on.cache_clear()
    assert optim.make_optimizer(w, 1e-3, TrainConfig()).param_groups[0]["fused"]
    real = torch.optim.AdamW

    def old_torch(params, *a, fused=None, **k):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                               "devices: ['cuda', 'xpu', 'privateuseone']")
        return real(params, *a, **k)

    monkeypatch.setattr(torch.optim, "AdamW", old_torch)
    optim.fused_adamw_on.cache_clear()
    try:
        assert not optim.make_optimizer(w, 1e-3, TrainConfig()).param_groups[0].get("fused")
    finally:
        optim.fused_adamw_on.cache_clear()
