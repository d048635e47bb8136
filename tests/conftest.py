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


def _build_store(tmp_path_factory, name: str, model: str, hooks: list[str]):
    """A finished activation store of 24 shapes images (size 64), timesteps 25 and 250, caption prompts."""
    from revelio.commands.extract import ExtractConfig, extract_cmd
    from revelio.config import load

    out = tmp_path_factory.mktemp(f"store_{name}") / f"{name}.h5"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and much faster when cores are shared
    cfg = load(ExtractConfig, overrides={
        "model": {"id": model}, "data": {"name": "shapes", "size": 64, "count": 24, "seed": 0},
        "hooks": hooks, "timesteps": [25, 250], "capture": "output", "pooling": "none", "prompt": "caption",
        "storage_dtype": "float32", "batch_size": 12, "seed": 0, "out": str(out), "progress": False})
    try:
        extract_cmd(cfg)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="session")
def sd_store(tmp_path_factory):
    """Path of a tiny-sd activation store: hooks mid_block (64x4x4) and up_blocks.1 (64x16x16), NCHW."""
    return _build_store(tmp_path_factory, "sd", "tiny-sd", ["mid_block", "up_blocks.1"])


@pytest.fixture(scope="session")
def flux_store(tmp_path_factory):
    """Path of a tiny-flux store: transformer_blocks.3 and single_transformer_blocks.1, image tokens (64, 64) NTC."""
    return _build_store(tmp_path_factory, "flux", "tiny-flux", ["transformer_blocks.3", "single_transformer_blocks.1"])


@pytest.fixture
def one_torch_thread():
    """Run a test's tiny-model compute on one thread (faster than two when other jobs share the cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
