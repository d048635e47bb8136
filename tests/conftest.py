"""Test-wide settings: offline hub, offline wandb, a private zoo cache for the session."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def revelio_home(tmp_path_factory):
    """Random-init zoo builds go to a per-session cache, never the user's."""
    home = tmp_path_factory.mktemp("revelio_home")
    old = os.environ.get("REVELIO_HOME")
    os.environ["REVELIO_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("REVELIO_HOME", None)
    else:
        os.environ["REVELIO_HOME"] = old


@pytest.fixture(scope="session")
def tiny_sd():
    from revelio.zoo import load_pipeline

    return load_pipeline("tiny-sd")


@pytest.fixture(scope="session")
def tiny_flux():
    from revelio.zoo import load_pipeline

    return load_pipeline("tiny-flux")
