import gc

import pytest

from tests.support.comfy_env import load_pack, setup_comfy
from tests.support.sd_fixtures import random_checkpoint


def free_comfy_memory():
    """Drop ComfyUI's loaded-model list (it keeps patched clones and weight backups alive)."""
    import comfy.model_management as mm

    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()


@pytest.fixture(scope="session")
def pack():
    setup_comfy()
    return load_pack()


@pytest.fixture(scope="module", params=["sd15", "sd21v"])
def native(request, pack):
    """(family, MODEL, CLIP, VAE) loaded from a random real-size checkpoint by ComfyUI's own loader."""
    import comfy.sd

    path = random_checkpoint(request.param)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True,
                                                                embedding_directory=None)
    yield request.param, model, clip, vae
    del model, clip, vae
    free_comfy_memory()


@pytest.fixture(scope="module")
def bridged(native, pack):
    family, model, clip, vae = native
    comps = pack.nodes.bridge.native_to_components(model, clip, vae)
    yield comps
    del comps
    gc.collect()


@pytest.fixture(scope="module")
def tiny_native(pack):
    """(components, MODEL, CLIP, VAE): the tiny random model over CLIP's real tokenizer, bridged into ComfyUI."""
    import importlib

    import torch
    from transformers import CLIPTokenizer

    bridge = pack.nodes.bridge
    tok = CLIPTokenizer.from_pretrained(str(bridge.TOKENIZER_DIR), model_max_length=77, local_files_only=True)
    with torch.inference_mode(False):
        comps = importlib.import_module("dynasyn_pack.dynasyn.tiny").tiny_components(seed=0, tokenizer=tok)
        model, clip, vae = bridge.tiny_native(comps)
    return comps, model, clip, vae
