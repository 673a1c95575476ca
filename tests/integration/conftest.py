import shutil

import pytest

from tests.support.comfy_server import ComfyServer, fresh_base


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real ComfyUI server for the integration tier, stopped at the end."""
    base = fresh_base(tmp_path_factory.mktemp("comfy_base"))
    with ComfyServer(base) as s:
        yield s
    shutil.rmtree(base, ignore_errors=True)  # several GB of test checkpoints
