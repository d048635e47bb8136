"""The activation store: layout (plain h5py), reader API and its math, errors."""

import h5py
import numpy as np
import pytest
import yaml

from extraction.store import ActivationStore, StoreError, open_store


def test_sd_store_layout_plain_h5py(sd_store):
    with h5py.File(sd_store, "r") as f:
        for k in ("format_version", "model", "model_class", "dataset", "config", "seed", "created", "package_version"):
            assert k in f.attrs, k
        assert bool(f.attrs["complete"]) and int(f.attrs["n_images"]) == 24
        cfg = yaml.safe_load(f.attrs["config"])
        assert cfg["hooks"] == ["mid_block", "up_blocks.1"] and cfg["timesteps"] == [25, 250]
        assert f["images/id"].shape == (24,) and f["images/done"][...].all()
        d = f["acts/up_blocks.1/t250"]
        assert d.shape == (24, 64, 16, 16) and d.dtype == np.float32
        assert d.attrs["layout"] == "NCHW" and int(d.attrs["timestep"]) == 250 and d.attrs["capture"] == "output"
        assert tuple(d.attrs["spatial"]) == (16, 16)
        assert f["acts/mid_block/t25"].shape == (24, 64, 4, 4)


def test_reader_api_matches_h5py(sd_store):
    with open_store(sd_store) as st, h5py.File(sd_store, "r") as f:
        assert st.hooks == ["mid_block", "up_blocks.1"]
        assert st.timesteps("mid_block") == [25, 250]
        assert set(st.keys()) == {(h, t) for h in st.hooks for t in (25, 250)}
        assert st.n_images == 24 and st.done.all()
        assert st.config["model"]["id"] == "tiny-sd" and st.attrs["seed"] == 0
        assert len(set(st.ids)) == 24 and st.captions[0] and st.labels.min() >= 0
        raw = f["acts/mid_block/t25"][...]
        rows = np.array([1, 5, 6, 20])
        np.testing.assert_array_equal(st.read("mid_block", 25, rows), raw[rows])
        np.testing.assert_array_equal(st.read("mid_block", 25, slice(3, 9)), raw[3:9])
        got = np.concatenate([a for _, a in st.iter_batches("mid_block", 25, 5)])
        np.testing.assert_array_equal(got, raw)
        # pooled = spatial mean, done by hand
        np.testing.assert_allclose(st.pooled("mid_block", 25), raw.mean(axis=(2, 3)), rtol=1e-6)
        # tokens: every position a sample, position (i, y, x) -> row i*16 + y*4 + x
        tok, idx = st.tokens("mid_block", 25, [2, 3])
        assert tok.shape == (32, 64) and list(idx[:16]) == [2] * 16 and list(idx[16:]) == [3] * 16
        np.testing.assert_array_equal(tok[16 + 1 * 4 + 2], raw[3, :, 1, 2])
        np.testing.assert_array_equal(st.image_map("mid_block", 25, 7), raw[7])
        assert st.layout("up_blocks.1", 25) == "NCHW" and st.spatial("up_blocks.1", 25) == (16, 16)
        assert st.d_in("up_blocks.1", 25) == 64


def test_flux_store_image_tokens(flux_store):
    with open_store(flux_store) as st, h5py.File(flux_store, "r") as f:
        assert st.hooks == ["single_transformer_blocks.1", "transformer_blocks.3"]
        for h in st.hooks:
            assert st.layout(h, 25) == "NTC" and st.spatial(h, 25) == (8, 8) and st.d_in(h, 25) == 64
        raw = f["acts/transformer_blocks.3/t25"][...]
        assert raw.shape == (24, 64, 64)
        m = st.image_map("transformer_blocks.3", 25, 4)
        # token k of the packed sequence is grid cell (k // 8, k % 8)
        assert m.shape == (64, 8, 8)
        np.testing.assert_array_equal(m[:, 2, 5], raw[4, 2 * 8 + 5])
        np.testing.assert_allclose(st.pooled("transformer_blocks.3", 25), raw.mean(axis=1), rtol=1e-6)
        tok, idx = st.tokens("transformer_blocks.3", 25, [0])
        np.testing.assert_array_equal(tok, raw[0])


def test_reader_errors(sd_store, tmp_path):
    with pytest.raises(FileNotFoundError):
        open_store(tmp_path / "missing.h5")
    with ActivationStore(sd_store) as st:
        with pytest.raises(KeyError, match="mid_block"):
            st.timesteps("up_blocks.9")
        with pytest.raises(KeyError, match=r"\[25, 250\]"):
            st.read("mid_block", 10, [0])
        with pytest.raises(ValueError, match="increasing"):
            st.read("mid_block", 25, [3, 1])
    bad = tmp_path / "other.h5"
    with h5py.File(bad, "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match="not an activation store"):
        open_store(bad)
    txt = tmp_path / "text.h5"
    txt.write_text("hello")
    with pytest.raises(StoreError, match="not an HDF5"):
        open_store(txt)
