"""The stage nodes (Drafts -> Compose -> stock ComfyUI inpainting -> Make Pair), SAM inputs (the pack's and Impact
Pack's SAM_MODEL), SAM / detector off the device after use, and the attention capture chained onto other packs'
attn2 patches. In-process: real ComfyUI 0.3.75 modules and the tiny random model made native by the bridge.
"""

import importlib

import pytest
import torch

from tests.support.scene import tensor_scene


def _mod(name):
    return importlib.import_module(f"dynasyn_pack.{name}")


def _node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


@pytest.fixture(scope="module")
def tiny(tiny_native):
    return tiny_native[1:]  # MODEL, CLIP, VAE


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    """ComfyUI's temp folder (the galleries' PNGs) under tmp_path; no interrupt pending; the test body in
    inference mode, as ComfyUI runs every node."""
    import comfy.model_management as mm
    import comfy.utils
    import folder_paths

    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", None)
    mm.interrupt_current_processing(False)
    with torch.inference_mode():
        yield tmp_path


def prompts(pack, count=2, seed=0):
    return _node(pack, "DynASynAugmentPrompts").prompts(
        "red panda\nblue bowl", "panda, bowl", count, "offline", "m", "http://127.0.0.1:9/v1", 10.0, seed)["result"][0]


def scene_inputs():
    image, masks, nouns = tensor_scene()
    return image[None], torch.stack(masks), nouns


def tiny_sam():
    return _mod("dynasyn.sam").build_tiny_sam()


def run_drafts(pack, tiny, bundle, **kw):
    model, clip, vae = tiny
    args = dict(model=model, clip=clip, vae=vae, prompts=bundle, first=1, count=2, size=64, steps=2, guidance=5.0,
                seed=3, sampler_name="euler", scheduler="normal", batch=2)
    args.update(kw)
    return _node(pack, "DynASynDrafts").drafts(**args)


# --------------------------------------------------------------------------------------- the stages, end to end
def test_drafts_compose_stock_inpaint_make_pair(pack, tiny, temp_dir):
    """Drafts -> Compose -> VAEEncode + SetLatentNoiseMask + KSampler -> VAEDecode -> Make Pair (appended twice)."""
    import nodes as comfy_nodes

    model, clip, vae = tiny
    image, masks, nouns = scene_inputs()
    bundle = prompts(pack)
    out = run_drafts(pack, tiny, bundle, sam={"model": tiny_sam(), "name": "tiny"})["result"]
    drafts, pseudo, templates, text, report = out
    kept = drafts.shape[0]
    assert kept >= 1 and drafts.shape[1:] == (64, 64, 3)
    assert pseudo.shape == (kept * 2, 64, 64)
    assert len(templates.splitlines()) == len(text.splitlines()) == kept
    for t, line in zip(templates.splitlines(), text.splitlines()):  # markers for Make Pair, descriptions for CLIP
        assert "[1]" in t and "[2]" in t and "red panda" in line and "blue bowl" in line
    assert report.startswith(f"{kept} drafts kept of 2")

    composed, inpaint, subject_masks = _node(pack, "DynASynCompose").compose(image, masks, drafts, pseudo, 8)
    assert composed.shape == drafts.shape and inpaint.shape == (kept, 64, 64) and subject_masks.shape == (kept * 2, 64, 64)
    lib = _mod("dynasyn.augment").compose(drafts[0], pseudo[:2], image[0], list(masks), _mod("dynasyn.augment").AugmentConfig())
    assert torch.equal(composed[0], lib.image) and torch.equal(inpaint[0], lib.inpaint_mask)  # the library's step 5

    # stock nodes inpaint the gaps: any ComfyUI sampler / inpaint model / ControlNet can stand here
    latent = comfy_nodes.VAEEncode().encode(vae, composed)[0]
    latent = comfy_nodes.SetLatentNoiseMask().set_mask(latent, inpaint)[0]
    pos = comfy_nodes.CLIPTextEncode().encode(clip, text.splitlines()[0])[0]
    neg = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    sampled = comfy_nodes.KSampler().sample(model, 1, 2, 5.0, "euler", "normal", pos, neg, latent, denoise=1.0)[0]
    augmented = comfy_nodes.VAEDecode().decode(vae, sampled)[0]

    make = _node(pack, "DynASynMakePair")
    first = make.make_pair(augmented, templates, "panda, bowl", subject_masks)["result"][0]
    assert len(first) == kept
    second = make.make_pair(augmented[:1], templates.splitlines()[0], "panda, bowl", subject_masks[:2], dataset=first,
                            sam={"model": tiny_sam(), "name": "tiny"})
    dataset, text_report = second["result"]
    assert len(first) == kept and len(dataset) == kept + 1  # appended; the connected output is left as it was
    assert dataset[:kept] == first and "1 pair(s) added" in text_report and "found again by SAM" in text_report
    assert second["ui"]["dynasyn_gallery"][0]["prompt"] == dataset[-1].class_prompt
    for pair, t in zip(dataset, templates.splitlines() + templates.splitlines()[:1]):
        template = _mod("dynasyn.prompts").PromptTemplate(t)
        pair.validate(2, nouns)  # what Train checks
        assert pair.class_prompt == template.render(nouns) and pair.subjects == template.subjects
        assert pair.masks.shape == (2, 64, 64) and pair.meta["template"] == t
    assert dataset[0].meta["mask_source"] == "pasted" and dataset[-1].meta["mask_source"] == "resegmented"
    order = dataset[0].subjects
    assert torch.equal(dataset[0].masks, subject_masks[:2][order])  # without SAM: the masks as given, in prompt order


def test_drafts_are_augments_drafts(pack, tiny, temp_dir):
    """The same function draws them: Drafts with the Augment node's seed and settings gives its drafts, prompt k
    with seed + k - 1 whatever slice or batch."""
    model, clip, vae = tiny
    image, masks, _ = scene_inputs()
    bundle = prompts(pack, count=3)
    augmented = _node(pack, "DynASynAugment").augment(
        model, clip, vae, image, masks, bundle, size=64, draft_steps=2, inpaint_steps=1, gsa_strength=0.7, gsa_steps=3,
        gsa_sampler="ddim", paper_exact=False, guidance=5.0, seed=3, draft_batch=3)["result"][2]
    whole = run_drafts(pack, tiny, bundle, count=3, batch=1)["result"]
    third = run_drafts(pack, tiny, bundle, first=3, count=1)["result"]
    assert whole[0].shape[0] == 3, "the attention pseudo-masks found both subjects in every draft"
    assert torch.allclose(whole[0], augmented, atol=1e-4)
    assert torch.allclose(third[0][0], augmented[2], atol=1e-4) and third[2] == whole[2].splitlines()[2]


def test_drafts_dropping_a_draft_without_a_subject(pack, tiny, temp_dir, monkeypatch):
    aug = _mod("dynasyn.augment")
    real = aug.pseudo_masks

    def lose_the_bowl_in_prompt_1(draft, n, sam=None, threshold=0.5, detector=None):
        out = real(draft, n, sam, threshold, detector)
        if draft.template.text == bundle["templates"][0].text:
            out[1] = 0
        return out

    bundle = prompts(pack)
    monkeypatch.setattr(aug, "pseudo_masks", lose_the_bowl_in_prompt_1)
    drafts, pseudo, templates, _, report = run_drafts(pack, tiny, bundle)["result"]
    assert drafts.shape[0] == 1 and pseudo.shape[0] == 2 and templates == bundle["templates"][1].text
    assert "prompt 1: no pseudo-mask for bowl" in report
    with pytest.raises(RuntimeError, match="(?s)No draft showed every subject.*prompt 1: no pseudo-mask for bowl"):
        run_drafts(pack, tiny, bundle, count=1)


# --------------------------------------------------------------------------------------- bad inputs, clear errors
def test_stage_nodes_refuse_bad_inputs_clearly(pack, tiny, temp_dir):
    image, masks, _ = scene_inputs()
    draft = torch.rand(2, 64, 64, 3)
    pseudo = torch.cat([masks, masks])
    compose = _node(pack, "DynASynCompose").compose
    with pytest.raises(RuntimeError, match="3 pseudo-masks for 2 image\\(s\\) of 2 subjects: give 4"):
        compose(image, masks, draft, pseudo[:3], 8)
    with pytest.raises(RuntimeError, match=r"pseudo-masks \(32x32\) must have the images' size \(64x64\)"):
        compose(image, masks, draft, torch.zeros(4, 32, 32), 8)
    with pytest.raises(RuntimeError, match=r"masks \(32x32\) must have the image's size \(64x64\)"):
        compose(image, torch.zeros(2, 32, 32), draft, pseudo, 8)
    with pytest.raises(RuntimeError, match="ONE image, not a batch of 2"):
        compose(torch.cat([image, image]), masks, draft, pseudo, 8)
    empty = pseudo.clone()
    empty[3] = 0
    with pytest.raises(RuntimeError, match=r"Draft 2: the pseudo-mask of subject\(s\) \[2\] is empty"):
        compose(image, masks, draft, empty, 8)

    make = _node(pack, "DynASynMakePair").make_pair
    with pytest.raises(RuntimeError, match="has no subject marker: write each subject it shows as \\[1\\], \\[2\\]"):
        make(draft, "a panda hugging a bowl", "panda, bowl", pseudo)
    with pytest.raises(RuntimeError, match=r"names subject \[3\], but there are 2 subjects"):
        make(draft, "[1] and [3] on a beach", "panda, bowl", pseudo)
    with pytest.raises(RuntimeError, match=r"names \[1\] more than once"):
        make(draft, "[1] chasing [1]", "panda, bowl", pseudo)
    with pytest.raises(RuntimeError, match="3 prompts for 2 images"):
        make(draft, "[1] on [2]\n[2] on [1]\n[1] and [2]", "panda, bowl", pseudo)
    with pytest.raises(RuntimeError, match="2 masks for 2 image\\(s\\) of 2 subjects: give 4"):
        make(draft, "[1] on [2]", "panda, bowl", masks)
    with pytest.raises(RuntimeError, match=r"masks \(32x32\) must have the images' size \(64x64\)"):
        make(draft, "[1] on [2]", "panda, bowl", torch.zeros(4, 32, 32))
    with pytest.raises(RuntimeError, match=r"Image 2: the mask of subject\(s\) \[2\] is empty"):
        make(draft, "[1] on [2]", "panda, bowl", empty)
    assert len(make(draft, "[1] alone on a beach", "panda, bowl", empty)["result"][0]) == 2  # [2] not named: fine
    with pytest.raises(RuntimeError, match="class noun of each subject"):
        make(draft, "[1] on [2]", " , ", pseudo)

    bundle = prompts(pack)
    with pytest.raises(RuntimeError, match="first = 5, but Augment Prompts gave 2 prompts"):
        run_drafts(pack, tiny, bundle, first=5)
    with pytest.raises(RuntimeError, match="Connect one SAM"):
        run_drafts(pack, tiny, bundle, sam={"model": tiny_sam(), "name": "tiny"}, sam_model=tiny_sam())


# --------------------------------------------------------------------------------------- Impact Pack's SAM_MODEL
def test_impact_packs_sam_model_is_accepted_where_a_sam_is_taken(pack, tiny, temp_dir):
    """Impact Pack's SAMLoader returns the segment-anything ``Sam`` itself (type SAM_MODEL)."""
    from segment_anything.modeling import Sam

    for name in ("DynASynSAMMasks", "DynASynAugment", "DynASynDrafts", "DynASynMakePair"):
        optional = pack.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()["optional"]
        assert optional["sam_model"][0] == "SAM_MODEL" and optional["sam"][0] == "DYNASYN_SAM", name
    image, _, _ = scene_inputs()
    sam = tiny_sam()
    assert isinstance(sam, Sam)
    node = _node(pack, "DynASynSAMMasks")
    boxes = '[{"box": [6, 6, 30, 30]}, {"box": [28, 34, 60, 60]}]'
    (impact,) = node.segment(image, boxes, True, sam_model=sam)
    (own,) = node.segment(image, boxes, True, sam={"model": sam, "name": "tiny"})
    assert impact.shape == (2, 64, 64) and torch.equal(impact, own)
    assert impact[0, 6:30, 6:30].all() and impact[1, 34:60, 28:60].all()  # the tiny SAM fills its box

    drafts = run_drafts(pack, tiny, prompts(pack), count=1, sam_model=sam)["result"]
    assert drafts[1].shape == (2, 64, 64)

    class SamHQ(torch.nn.Module):  # another pack's SAM_MODEL (storyicon's SAM-HQ uses the same type name)
        pass

    with pytest.raises(RuntimeError, match="SAM_MODEL connected is a SamHQ, not a segment-anything SAM"):
        node.segment(image, boxes, True, sam_model=SamHQ())
    with pytest.raises(RuntimeError, match="Connect a SAM"):
        node.segment(image, boxes, True)


# --------------------------------------------------------------------------------------- off the device after use
class DeviceLog:
    """Records each move of a module and each cache emptying, in order."""

    def __init__(self, monkeypatch, *modules):
        import comfy.model_management as mm

        self.events = []
        real_empty = mm.soft_empty_cache
        monkeypatch.setattr(mm, "soft_empty_cache", lambda *a, **k: (self.events.append("empty"), real_empty(*a, **k))[1])
        for m in modules:
            real_to = m.to

            def to(*args, _real=real_to, _name=type(m).__name__, **kw):
                device = torch.device(args[0] if args else kw["device"])
                self.events.append((_name, device.type))
                return _real(*args, **kw)

            monkeypatch.setattr(m, "to", to)


def on_device(module) -> str:
    return next(module.parameters()).device.type


@pytest.mark.parametrize("which", ["sam", "sam_model"])
def test_sam_is_on_the_compute_device_only_while_the_node_runs(pack, tiny, temp_dir, monkeypatch, which):
    import comfy.model_management as mm

    sam = tiny_sam()
    log = DeviceLog(monkeypatch, sam)
    compute = mm.get_torch_device()
    seen = []
    real_segment = _mod("dynasyn.sam").segment

    def segment(model, *a, **kw):
        seen.append(on_device(model))  # where the model really is while SAM runs
        log.events.append("segment")
        return real_segment(model, *a, **kw)

    for where in ("dynasyn.sam", "dynasyn.drafts"):
        monkeypatch.setattr(_mod(where), "segment", segment)
    image, _, _ = scene_inputs()
    given = {"sam": {"model": sam, "name": "tiny"}} if which == "sam" else {"sam_model": sam}
    _node(pack, "DynASynSAMMasks").segment(image, '[{"box": [6, 6, 30, 30]}]', True, **given)
    assert seen == [compute.type]
    assert log.events == [("Sam", compute.type), "segment", ("Sam", "cpu"), "empty"]
    assert on_device(sam) == "cpu"

    # Augment-like stages: moved once for the whole node, released after it, on an error as well
    log.events.clear()
    run_drafts(pack, tiny, prompts(pack), count=2, **given)
    assert log.events[0] == ("Sam", compute.type) and log.events[-2:] == [("Sam", "cpu"), "empty"]
    assert log.events.count("segment") == 2 and on_device(sam) == "cpu"
    log.events.clear()
    with pytest.raises(RuntimeError, match="first = 9"):
        run_drafts(pack, tiny, prompts(pack), first=9, **given)
    assert on_device(sam) == "cpu"
    monkeypatch.setattr(_mod("dynasyn.drafts"), "segment", lambda *a, **k: (_ for _ in ()).throw(ValueError("broke")))
    log.events.clear()
    with pytest.raises(RuntimeError, match="broke"):
        run_drafts(pack, tiny, prompts(pack), count=1, **given)
    assert log.events == [("Sam", compute.type), ("Sam", "cpu"), "empty"] and on_device(sam) == "cpu"


def test_sam_and_detector_leave_a_gpu_after_the_node(pack, tiny, temp_dir, monkeypatch):
    """With ComfyUI's compute device a GPU: loaders keep SAM and the detector on the CPU, the node moves them there
    for its work (after ComfyUI made room), and back. The GPU is simulated by the device check only; the modules'
    moves are real except the one onto that device, which is recorded instead."""
    import sys

    import comfy.model_management as mm

    for name in ("dynasyn", "dynasyn.tiny"):  # the helper imports the library under its own name
        monkeypatch.setitem(sys.modules, name, _mod(name))
    from tests.support.tiny_detector import write_tiny_owlvit

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(mm, "get_torch_device", lambda: gpu)
    freed = []
    monkeypatch.setattr(mm, "free_memory", lambda need, device, keep_loaded=[]: freed.append((need, device)) or [])
    monkeypatch.setattr(mm, "soft_empty_cache", lambda *a, **k: freed.append("empty"))

    grounding = pack.nodes.grounding_node
    write_tiny_owlvit(temp_dir / "grounding" / "owlvit-tiny")
    monkeypatch.setattr(grounding, "detector_folders", lambda: {"owlvit-tiny": str(temp_dir / "grounding" / "owlvit-tiny")})
    (detector,) = _node(pack, "DynASynDetectorLoader").load("owlvit-tiny", 0.0)
    assert on_device(detector.model) == "cpu"  # loaded on the CPU, not on the (simulated) GPU
    (sam,) = _node(pack, "DynASynSAMLoader").load("tiny (random test-size SAM, for trying graphs)")
    assert on_device(sam["model"]) == "cpu"

    moves = []
    for m in (sam["model"], detector.model):
        real_to = m.to

        def to(device, _real=real_to, _m=m):
            moves.append((type(_m).__name__, torch.device(device)))
            return _real("cpu")  # no CUDA here: the move onto the GPU is recorded, the module stays usable

        monkeypatch.setattr(m, "to", to)
    run_drafts(pack, tiny, prompts(pack), count=1, sam=sam, detector=detector)
    names = [n for n, _ in moves]
    assert moves[:2] == [(names[0], gpu), (names[1], gpu)] and moves[2:] == [(names[0], torch.device("cpu")),
                                                                          (names[1], torch.device("cpu"))]
    assert set(names) == {"Sam", type(detector.model).__name__}
    assert freed[0][1] == gpu and freed[0][0] > mm.module_size(sam["model"]) and freed[-1] == "empty"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sam_releases_gpu_memory_for_real(pack, temp_dir):
    import comfy.model_management as mm

    if mm.get_torch_device().type != "cuda":
        pytest.skip("ComfyUI runs on the CPU here (--cpu)")
    image, _, _ = scene_inputs()
    sam = tiny_sam()
    before = torch.cuda.memory_allocated()
    _node(pack, "DynASynSAMMasks").segment(image, '[{"box": [6, 6, 30, 30]}]', True, sam_model=sam)
    assert on_device(sam) == "cpu" and torch.cuda.memory_allocated() == before


# --------------------------------------------------------------------------------------- attn2 patches chain
def test_attention_capture_chains_onto_another_packs_attn2_patches(pack, tiny):
    """Another pack's attn2 replacement (per block and per transformer) and attn2 input patch installed first still
    run, and the capture still records; the output is the other pack's."""
    from comfy.ldm.modules.attention import optimized_attention

    render = _mod("nodes.comfy_render")
    model, clip, _ = tiny
    calls = {"replace": 0, "replace3": 0, "input": 0}

    def other_replace(q, k, v, extra_options):  # e.g. IPAdapter: attention with a change of its own
        calls["replace"] += 1
        return optimized_attention(q, k, v, extra_options["n_heads"]) * 0.5

    def other_replace3(q, k, v, extra_options):
        calls["replace3"] += 1
        return optimized_attention(q, k, v, extra_options["n_heads"]) * 0.25

    def other_input_patch(n, context, value, extra_options):
        calls["input"] += 1
        return n, context, value

    other = model.clone()
    other.set_model_attn2_replace(other_replace, "output", 0)         # both on captured (16x16) blocks
    other.set_model_attn2_replace(other_replace3, "output", 1, 0)
    other.set_model_attn2_patch(other_input_patch)
    capture = render.NativeAttentionCapture()
    patched = render.with_attention_capture(other, capture)

    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a red panda sitting in a blue bowl"))[0][0]
    x = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    sigma = model.get_model_object("model_sampling").sigma(torch.tensor([500.0]))

    def run(m):
        options = {**m.model_options["transformer_options"], "cond_or_uncond": [0]}
        return m.model.apply_model(x, sigma, c_crossattn=cond, transformer_options=options)

    theirs = run(other)
    assert calls == {"replace": 1, "replace3": 1, "input": 7}  # 7 transformer blocks in the tiny UNet
    ours = run(patched)
    assert calls == {"replace": 2, "replace3": 2, "input": 14}  # still run under the capture
    assert torch.allclose(ours, theirs, atol=1e-5)  # and still decide the output
    assert capture.calls == 3 and capture.blocks == {("input", 3), ("output", 0), ("output", 1)}  # recorded as well
    maps = capture.maps(32, 32)
    assert maps.shape == (1, 16, 16, 77) and torch.allclose(maps.sum(-1), torch.ones(1, 16, 16), atol=1e-4)
    assert not torch.allclose(run(model), theirs, atol=1e-4)  # (the other pack's patches do change the output)
