import os

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def pytest_collection_modifyitems(config, items):
    """Every test on a random real-size SD checkpoint (the format tier's ``native`` fixture) is ``realsize``."""
    import pytest

    for item in items:
        if "native" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.realsize)
