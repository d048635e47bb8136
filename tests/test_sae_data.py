"""The SAE data module's read path: batches equal the store's samples on every path (mapped HDF5 chunks,
h5py reads of a compressed store, the token-major cache), shuffling mixes images and positions, memory
stays one shuffle buffer on a store many buffers large, and DDP ranks read disjoint images."""

import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import stats

import sae.data
from extraction.store import ActSpec, Batch, StoreWriter, create_store, open_store
from sae import token_cache as _tc
from sae.data import StoreDataModule, _map_dataset
from sae.token_cache import CacheStream

HOOK = "h"


def make_store(path: Path, n: int, row_shape: tuple[int, ...], layout: str, dtype: str = "float32",
               compression: str | None = None) -> Path:
    """A store of random activations written with the extraction writer (16 images per HDF5 chunk)."""
    ids = [f"img{i:04d}" for i in range(n)]
    spatial = (row_shape[1], row_shape[2]) if layout == "NCHW" else (8, row_shape[0] // 8)
    create_store(path, source_index=list(range(n)), source_ids=ids,
                 specs=[ActSpec(HOOK, 25, row_shape, layout, "output", spatial)],
                 attrs={"model": "synthetic", "dataset": "random", "config": "{}"}, storage_dtype=dtype,
                 batch_size=16, compression=compression)
    w = StoreWriter(path)
    rng = np.random.default_rng(1)
    for i in range(0, n, 16):
        k = min(16, n - i)
        w.write(Batch(np.arange(i, i + k), ids[i:i + k], np.full(k, -1), [""] * k,
                      {(HOOK, 25): rng.standard_normal((k, *row_shape), dtype=np.float32).astype(dtype)},
                      np.zeros(0, np.int64)))
    w.finish()
    w.close()
    return path


def epoch(dm, epoch=0, start=0, workers=0):
    dm.num_workers = workers
    loader = dm.loader(dm.train_rows, shuffle=True)
    dm.resume_at(epoch, start)
    dm._epoch_counter = epoch - 1
    return [(x.numpy().copy(), r.numpy().copy()) for x, r in loader]


def positions(store, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The position of each sample inside its image, found by matching it against the store's tokens."""
    with open_store(store) as st:
        out = np.empty(len(rows), np.int64)
        for r in np.unique(rows):
            tok, _ = st.tokens(HOOK, 25, [int(r)])
            m = rows == r
            eq = (x[m].astype(np.float32)[:, None, :] == tok[None]).all(axis=2)
            assert eq.sum(axis=1).min() == 1, "every sample is exactly one token of its image"
            out[m] = eq.argmax(axis=1)
    return out


@pytest.fixture(scope="module")
def nchw(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("nchw") / "nchw.h5", 96, (8, 4, 4), "NCHW")


def test_batches_mix_images_and_positions(nchw):
    """The shuffle-buffer stream: chi-square tests on the first batches: images of the buffer and positions
    are drawn evenly."""
    dm = StoreDataModule(str(nchw), HOOK, 25, samples="tokens", batch_size=192, val_fraction=0.25,
                         chunk_images=4, buffer_chunks=6, check_finite=False, token_cache=False)
    dm.setup()
    assert len(np.intersect1d(dm.train_rows, dm.val_rows)) == 0 and len(dm.val_rows) == 24
    ds = dm.loader(dm.train_rows, shuffle=True).dataset
    buf_rows = np.sort(np.concatenate([ds.chunks[c] for c in ds.groups(0)[0]]))  # 24 images x 16 positions
    batches = epoch(dm)
    assert len(batches) == 72 * 16 // 192
    for x, r in batches[:2]:  # both from the first buffer (384 samples)
        assert set(r) <= set(buf_rows)
        counts = np.array([(r == b).sum() for b in buf_rows])
        assert stats.chisquare(counts).pvalue > 1e-3, counts  # 8 per image expected
        assert (counts > 0).sum() >= 18  # a batch of 192 touches most of the 24 images
        pos = positions(nchw, x, r)
        assert stats.chisquare(np.bincount(pos, minlength=16)).pvalue > 1e-3  # 12 per position expected
        # positions are not tied to images: position counts of the first and second half of the images agree
        half = np.isin(r, buf_rows[:12])
        table = np.stack([np.bincount(pos[half] // 4, minlength=4), np.bincount(pos[~half] // 4, minlength=4)])
        assert stats.chi2_contingency(table).pvalue > 1e-3
    rows = np.concatenate([r for _, r in batches])
    assert np.bincount(rows).max() <= 16 and not np.isin(rows, dm.val_rows).any()
    val_rows = np.concatenate([r.numpy() for _, r in dm.val_dataloader()])
    assert set(val_rows) == set(dm.val_rows)


def test_every_read_path_yields_the_same_batches(nchw, tmp_path):
    """The shuffle-buffer stream over mapped chunks and h5py reads of a gzip store, 0 and 2 workers:
    identical batches, which are the store's tokens; a resumed pass is the exact tail."""
    gz = make_store(tmp_path / "gz.h5", 96, (8, 4, 4), "NCHW", compression="gzip")
    with h5py.File(gz) as f, h5py.File(nchw) as g:
        assert _map_dataset(str(gz), f["acts/h/t25"]) is None and _map_dataset(str(nchw), g["acts/h/t25"]) is not None
        np.testing.assert_array_equal(f["acts/h/t25"][...], g["acts/h/t25"][...])
    kw = dict(samples="tokens", batch_size=100, val_fraction=0.1, chunk_images=8, buffer_chunks=2, check_finite=False,
              token_cache=False)
    runs = {}
    for name, store in (("map", nchw), ("h5py", gz)):
        dm = StoreDataModule(str(store), HOOK, 25, **kw)
        dm.setup()
        runs[name] = epoch(dm)
        tail = epoch(dm, start=5)
        for (a, ra), (b, rb) in zip(runs[name][5:], tail):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(ra, rb)
        assert len(tail) == len(runs[name]) - 5
        if name == "map":  # 2 workers gather into shared memory: a fixed round-robin, resumed exactly
            two, two_tail = epoch(dm, workers=2), epoch(dm, start=3, workers=2)
            assert len(two_tail) == len(two) - 3 > 0
            for (a, ra), (b, rb) in zip(two[3:], two_tail):
                np.testing.assert_array_equal(a, b)
                np.testing.assert_array_equal(ra, rb)
    assert len(runs["map"]) == len(runs["h5py"])
    for (a, ra), (b, rb) in zip(runs["map"], runs["h5py"]):
        np.testing.assert_array_equal(ra, rb)
        np.testing.assert_array_equal(a, b)
    x, r = runs["map"][0]
    assert x.dtype == np.float32 and len(set(r)) > 4
    positions(nchw, x, r)  # each sample is a token of the image it names


def _mapping_rss(path: Path) -> int:
    """Resident bytes of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps")
@pytest.mark.parametrize("layout", ["NTC", "NCHW"])
def test_memory_is_one_buffer_on_a_store_many_buffers_large(tmp_path, monkeypatch, layout):
    """A 72 MiB store, a 16-image (768 KiB) buffer: the store's pages resident in this process at any batch
    stay within two buffers plus the 2 MiB release windows, and no block is larger than a buffer."""
    shape = (64, 192) if layout == "NTC" else (192, 8, 8)
    store = make_store(tmp_path / "big.h5", 1536, shape, layout)
    blocks = []
    real = sae.data._Source.block
    monkeypatch.setattr(sae.data._Source, "block",
                        lambda self, rows, out=None: blocks.append(len(rows)) or real(self, rows, out))
    dm = StoreDataModule(str(store), HOOK, 25, samples="tokens", batch_size=512, val_fraction=0.1,
                         chunk_images=8, buffer_chunks=2, check_finite=False, token_cache=False)
    dm.setup()
    buffer_bytes = 16 * 64 * 192 * 4
    peak, n = 0, 0
    dm.num_workers = 0
    for x, _ in dm.loader(dm.train_rows, shuffle=True):
        peak = max(peak, _mapping_rss(store))
        n += len(x)
    bound = 2 * buffer_bytes + 2 * 2 * 2 * (2 << 20)  # 2 buffers of 2 chunks, each widened by 2 MiB a side
    assert n >= 0.95 * len(dm.train_rows) * 64 and store.stat().st_size > 4 * bound
    assert peak <= bound, (peak, bound)
    assert blocks and max(blocks) <= 16  # never more than one buffer's rows at once


def _ddp_rank(rank: int, world: int, store: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dm = StoreDataModule(store, HOOK, 25, samples="tokens", batch_size=64, val_fraction=0.1, chunk_images=4,
                             buffer_chunks=2, check_finite=False, token_cache=False)
        dm.setup()
        res = []
        for e in (0, 1):
            rows = [r for _, r in epoch(dm, epoch=e)]
            gathered = [None] * world
            dist.all_gather_object(gathered, (len(rows), np.unique(np.concatenate(rows)).tolist()))
            res.append(gathered)
        if rank == 0:
            torch.save({"res": res, "train": dm.train_rows.tolist()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_read_disjoint_images_every_epoch(nchw, tmp_path):
    """The shuffle-buffer stream, 2 gloo processes: in every epoch the ranks' images are disjoint, cover the training split (minus the
    few samples an equal batch count drops) and both ranks step the same number of batches."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_rank, args=(2, str(nchw), port, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    train = set(got["train"])
    for gathered in got["res"]:
        (n0, rows0), (n1, rows1) = gathered
        assert n0 == n1 > 0
        assert not set(rows0) & set(rows1)
        assert set(rows0) | set(rows1) <= train and len(set(rows0) | set(rows1)) >= 0.8 * len(train)
    assert got["res"][0][0][1] != got["res"][1][0][1]  # a new shuffle of the buffers each epoch


# ---- several timesteps pooled (issue 19) -----------------------------------------------------------------------

TS = (25, 250, 500)


def make_store_ts(path: Path, n: int, row_shape: tuple[int, ...], timesteps=TS) -> Path:
    """An NCHW store of one hook at several timesteps; the value of every element encodes (row, t index,
    position, channel), so each sample names where it came from."""
    ids = [f"img{i:04d}" for i in range(n)]
    C, H, W = row_shape
    create_store(path, source_index=list(range(n)), source_ids=ids,
                 specs=[ActSpec(HOOK, t, row_shape, "NCHW", "output", (H, W)) for t in timesteps],
                 attrs={"model": "synthetic", "dataset": "random", "config": "{}"}, storage_dtype="float32",
                 batch_size=16)
    w = StoreWriter(path)
    pos = np.arange(H * W).reshape(1, 1, H, W)
    ch = np.arange(C).reshape(1, C, 1, 1)
    for i in range(0, n, 16):
        k = min(16, n - i)
        rows = np.arange(i, i + k).reshape(k, 1, 1, 1)
        acts = {(HOOK, t): (rows * 100000 + j * 10000 + pos * 100 + ch).astype(np.float32)
                for j, t in enumerate(timesteps)}
        w.write(Batch(np.arange(i, i + k), ids[i:i + k], np.full(k, -1), [""] * k, acts, np.zeros(0, np.int64)))
    w.finish()
    w.close()
    return path


def decode(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, t index, position) of each sample of a ``make_store_ts`` store; checks the channels."""
    v = x.astype(np.int64)
    assert (v - v[:, :1] == np.arange(v.shape[1])).all()
    v = v[:, 0]
    return v // 100000, v // 10000 % 10, v // 100 % 100


@pytest.fixture(scope="module")
def multi_t(tmp_path_factory):
    return make_store_ts(tmp_path_factory.mktemp("ts") / "ts.h5", 96, (8, 4, 4))


def epoch_t(dm, epoch=0, start=0, workers=0):
    dm.num_workers = workers
    loader = dm.loader(dm.train_rows, shuffle=True)
    dm.resume_at(epoch, start)
    dm._epoch_counter = epoch - 1
    return [tuple(a.numpy().copy() for a in b) for b in loader]


def test_timesteps_pooled_and_mixed_in_batches(multi_t):
    """Three timesteps: each batch carries the timestep index of each sample (it matches the sample's
    values); a buffer holds chunks of random timesteps and a batch draws its timesteps in the buffer's
    proportions (chi-square), independently of the position; an epoch visits every (image, t, position)
    at most once; a resumed pass is the exact tail; validation covers the held-out images at every t."""
    dm = StoreDataModule(str(multi_t), HOOK, list(TS), samples="tokens", batch_size=192, val_fraction=0.25,
                         chunk_images=4, buffer_chunks=6, check_finite=True, token_cache=False)
    dm.setup()
    assert dm.with_t and dm.timesteps == list(TS) and dm.timestep == 25
    ds = dm.loader(dm.train_rows, shuffle=True).dataset
    assert len(ds.chunks) == 3 * 18
    batches = epoch_t(dm)
    assert len(batches) == 3 * 72 * 16 // 192
    firsts = []
    for b, (x, r, ti) in enumerate(batches):
        rows, tix, pos = decode(x)
        np.testing.assert_array_equal(rows, r)
        np.testing.assert_array_equal(tix, ti)
        firsts.append(len(np.unique(ti)))
    for g, (x, r, ti) in zip(range(2), batches[:2]):  # both from the first buffer (6 chunks x 64 samples)
        buf_t = np.array([ds.chunk_t[c] for c in ds.groups(0)[0]])
        expect = np.bincount(buf_t, minlength=3) * 64 / 384 * 192
        if (expect > 0).sum() > 1:
            keep = expect > 0
            counts = np.bincount(ti, minlength=3)[keep]
            assert stats.chisquare(counts, expect[keep]).pvalue > 1e-3, (counts, expect)
            _, _, pos = decode(x)
            table = np.stack([np.bincount(pos[ti == i] // 4, minlength=4) for i in np.flatnonzero(keep)])
            assert stats.chi2_contingency(table).pvalue > 1e-3  # positions are not tied to timesteps
    assert np.mean(np.array(firsts) > 1) > 0.5  # most batches mix timesteps
    # over the epoch the timesteps are visited evenly: a batch's t share varies around 1/3 in both halves
    allt = np.concatenate([ti for _, _, ti in batches])
    assert np.abs(np.bincount(allt, minlength=3) / len(allt) - 1 / 3).max() < 0.02
    key = np.concatenate([decode(x)[0] * 10000 + decode(x)[1] * 100 + decode(x)[2] for x, _, _ in batches])
    assert len(np.unique(key)) == len(key)  # no sample twice
    tail = epoch_t(dm, start=5)
    assert len(tail) == len(batches) - 5
    for a, b in zip(batches[5:], tail):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    val = [tuple(a.numpy() for a in b) for b in dm.val_dataloader()]
    vt = np.concatenate([v[2] for v in val])
    vr = np.concatenate([v[1] for v in val])
    for i in range(3):
        assert set(vr[vt == i]) == set(dm.val_rows) and (vt == i).sum() == len(dm.val_rows) * 16
    x = dm.sample(2000)  # the b_dec sample pools timesteps too (32 of the 54 chunks)
    assert len(np.unique(decode(x.numpy())[1])) == 3
    with pytest.raises(KeyError, match="timestep 30 of hook 'h' is not in"):
        StoreDataModule(str(multi_t), HOOK, [25, 30]).setup()
    with pytest.raises(ValueError, match="name a timestep twice"):
        StoreDataModule(str(multi_t), HOOK, [25, 25])


def test_token_cache_batches_mix_images_positions_and_timesteps(multi_t, monkeypatch):
    """The default tokens path reads the pre-shuffled cache: each sample is labelled right (values encode
    row, t, position), no held-out image is in it, an epoch visits every training (image, t, position)
    exactly once, batches draw images, positions and timesteps evenly and independently (chi-square),
    epochs recombine the runs into new batches, resume is exact and 2 reader threads give the same stream
    (forced on: batches this small are read without threads by default)."""
    dm = StoreDataModule(str(multi_t), HOOK, list(TS), samples="tokens", batch_size=192, val_fraction=0.25,
                         check_finite=False)
    dm.setup()
    loader = dm.loader(dm.train_rows, shuffle=True)
    assert isinstance(loader.dataset, CacheStream) and loader.dataset.R == 8 and loader.dataset.L == 24
    batches = epoch_t(dm)
    n_train = len(dm.train_rows)
    assert n_train == 72 and len(batches) == 72 * 3 * 16 // 192
    keys = []
    for x, r, ti in batches:
        rows, tix, pos = decode(x)
        np.testing.assert_array_equal(rows, r)
        np.testing.assert_array_equal(tix, ti)
        assert not np.isin(r, dm.val_rows).any()
        assert len(np.unique(r)) >= 55  # 192 draws from 72 images touch about 67 of them
        keys.append(rows * 10000 + tix * 100 + pos)
    allk = np.concatenate(keys)
    assert len(np.unique(allk)) == len(allk) == n_train * 3 * 16  # every training sample once
    x = np.concatenate([b[0] for b in batches[:6]])  # 1152 samples: 16 per image, 72 per position, 384 per t
    rows, tix, pos = decode(x)
    assert stats.chisquare(np.bincount(np.searchsorted(dm.train_rows, rows), minlength=n_train)).pvalue > 1e-3
    assert stats.chisquare(np.bincount(pos, minlength=16)).pvalue > 1e-3
    assert stats.chisquare(np.bincount(tix, minlength=3)).pvalue > 1e-3
    assert stats.chi2_contingency(np.stack([np.bincount(pos[tix == i] // 4, minlength=4) for i in range(3)])
                                  ).pvalue > 1e-3
    half = np.isin(rows, dm.train_rows[:36])
    assert stats.chi2_contingency(np.stack([np.bincount(pos[half] // 4, minlength=4),
                                            np.bincount(pos[~half] // 4, minlength=4)])).pvalue > 1e-3
    other = epoch_t(dm, epoch=1)
    sets0 = {frozenset(k.tolist()) for k in keys}
    assert not sets0 & {frozenset((decode(x)[0] * 10000 + decode(x)[1] * 100 + decode(x)[2]).tolist())
                        for x, _, _ in other}
    tail = epoch_t(dm, start=5)
    assert len(tail) == len(batches) - 5
    for a, b in zip(batches[5:], tail):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)
    dm.num_workers = 2
    assert dm.loader(dm.train_rows, shuffle=True).dataset.reader_threads == 0  # 192 x 4 x 4 bytes: under the bar
    monkeypatch.setattr(_tc, "THREAD_MIN_BATCH_BYTES", 0)
    assert dm.loader(dm.train_rows, shuffle=True).dataset.reader_threads == 2
    for start in (0, 3):
        two = epoch_t(dm, start=start, workers=2)
        assert len(two) == len(batches) - start
        for a, b in zip(batches[start:], two):
            for u, v in zip(a, b):
                np.testing.assert_array_equal(u, v)
    val = [tuple(a.numpy() for a in b) for b in dm.val_dataloader()]  # validation reads the store, in order
    assert set(np.concatenate([v[1] for v in val])) == set(dm.val_rows)


def test_token_cache_follows_the_store_and_the_split_and_survives_bad_folders(tmp_path, caplog):
    """The cache is built once; a rewritten store or another split gets a new one (the old is removed); a small
    bucket budget (many buckets, the external shuffle's two passes) writes the same bytes; the cache holds
    exactly the training tokens; where it cannot be written, training reads the store's shuffle buffers."""
    store = make_store(tmp_path / "s.h5", 40, (8, 4, 4), "NCHW")
    dm = StoreDataModule(str(store), HOOK, 25, samples="tokens", batch_size=32, check_finite=False)
    dm.setup()
    data, meta, info = dm._cache
    assert info["n"] == len(dm.train_rows) * 16 and info["C"] == 8 and info["dtype"] == "float32"
    tok, m = np.load(data), np.load(meta)
    with open_store(store) as st:
        want, want_rows = st.tokens(HOOK, 25, dm.train_rows)
    order = np.lexsort(tok.T[::-1])
    worder = np.lexsort(want.T[::-1])
    np.testing.assert_array_equal(tok[order], want[worder])  # the same tokens, shuffled
    np.testing.assert_array_equal(m[order], want_rows[worder])  # each with its store row
    assert not np.array_equal(tok, want)
    again, _, _ = _tc.build(store, HOOK, [25], dm.train_rows, 0, bucket_bytes=8 * 4 * 50, block_images=4)
    assert again == data  # already there: not rebuilt
    data.unlink()
    small, small_meta, _ = _tc.build(store, HOOK, [25], dm.train_rows, 0, bucket_bytes=8 * 4 * 50, block_images=4,
                                     progress=False)
    np.testing.assert_array_equal(np.load(small), tok)  # 13 buckets of 50 tokens: the same permutation
    np.testing.assert_array_equal(np.load(small_meta), m)
    dm1 = StoreDataModule(str(store), HOOK, 25, samples="tokens", batch_size=32, check_finite=False, seed=1)
    dm1.setup()
    assert dm1._cache[0] != data and not data.exists()  # another split: its own cache, the old one removed
    os.utime(store, ns=(1, 1))
    dm1b = StoreDataModule(str(store), HOOK, 25, samples="tokens", batch_size=32, check_finite=False, seed=1)
    dm1b.setup()
    assert dm1b._cache[0] != dm1._cache[0]  # the store changed: rebuilt
    assert [p.name for p in data.parent.glob("*.json")] == [dm1b._cache[0].name[:-4] + ".json"]  # one cache left
    blocked = make_store(tmp_path / "b.h5", 40, (8, 4, 4), "NCHW")
    (tmp_path / "b.h5.tokens").write_text("not a folder")
    dmb = StoreDataModule(str(blocked), HOOK, 25, samples="tokens", batch_size=32, check_finite=False)
    with caplog.at_level("WARNING"):
        dmb.setup()
    assert dmb._cache is None and "cannot write the token cache" in caplog.text
    assert len(list(dmb.train_dataloader())) == len(dmb.train_rows) * 16 // 32


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps")
def test_token_cache_memory_is_one_batch_on_a_large_store(tmp_path, monkeypatch):
    """A 72 MiB store read through the cache: no page of the cache is mapped into this process and resident
    memory grows by far less than the store (batches are 393 KiB), with and without reader threads (forced on
    for these small batches)."""
    import psutil

    monkeypatch.setattr(_tc, "THREAD_MIN_BATCH_BYTES", 0)
    store = make_store(tmp_path / "big.h5", 1536, (192, 8, 8), "NCHW")
    dm = StoreDataModule(str(store), HOOK, 25, samples="tokens", batch_size=512, val_fraction=0.1, check_finite=False)
    dm.setup()
    proc = psutil.Process()
    for workers in (0, 2):
        dm.num_workers = workers
        before = peak = proc.memory_info().rss
        n = 0
        for x, _ in dm.loader(dm.train_rows, shuffle=True):
            peak = max(peak, proc.memory_info().rss)
            n += len(x)
            assert _mapping_rss(dm._cache[0]) == 0
        assert n == len(dm.train_rows) * 64 // 512 * 512
        assert peak - before < 32 << 20, (workers, peak - before)  # allocator slack; the store is 72 MiB
    assert store.stat().st_size > 64 << 20


def _ddp_rank_t(rank: int, world: int, store: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        dm = StoreDataModule(store, HOOK, list(TS), samples="tokens", batch_size=64, val_fraction=0.1,
                             chunk_images=4, buffer_chunks=2, check_finite=False)
        dm.setup()
        got = epoch_t(dm)
        keys = np.concatenate([decode(x)[0] * 10000 + decode(x)[1] * 100 + decode(x)[2] for x, _, _ in got])
        gathered = [None] * world
        dist.all_gather_object(gathered, (len(got), keys.tolist()))
        if rank == 0:
            torch.save({"res": gathered, "train": dm.train_rows.tolist()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_read_disjoint_samples_of_several_timesteps(multi_t, tmp_path):
    """2 gloo processes over 3 timesteps: the ranks step the same number of batches and never read the
    same (image, t, position); together they cover nearly all of them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_rank_t, args=(2, str(multi_t), port, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    (n0, k0), (n1, k1) = got["res"]
    assert n0 == n1 > 0
    assert not set(k0) & set(k1)
    assert len(set(k0) | set(k1)) >= 0.8 * len(got["train"]) * 3 * 16
    assert {k // 100 % 100 for k in k0} == {0, 1, 2} == {k // 100 % 100 for k in k1}
