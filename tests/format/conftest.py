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
