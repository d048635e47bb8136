"""Probes on synthetic data: the math against hand computations / independent code, planted signals, errors."""

from __future__ import annotations

import numpy as np
import pytest

import probes
from extraction.store import ActSpec, Batch, StoreWriter, create_store, open_store
from probes import ProbeError

FAST = dict(Cs=[0.01, 1.0, 100.0], cv=3)


def make_store(path, acts: dict[tuple[str, int], np.ndarray], labels: np.ndarray, layout: str = "NC",
               spatial=(1, 1)):
    """A finished store holding ``acts`` (N, ...) per (hook, t) and ``labels``, written by extraction's writer."""
    n = len(labels)
    specs = [ActSpec(h, t, a.shape[1:], layout, "output", spatial) for (h, t), a in acts.items()]
    ids = [f"img-{i:04d}" for i in range(n)]
    create_store(path, source_index=list(range(n)), source_ids=ids, specs=specs,
                 attrs={"model": "synthetic", "dataset": "synthetic", "config": "{}", "seed": 0}, batch_size=n)
    w = StoreWriter(path)
    w.write(Batch(positions=np.arange(n), ids=ids, labels=np.asarray(labels), captions=[""] * n,
                  acts={k: v.astype(np.float32) for k, v in acts.items()}, skipped_positions=np.zeros(0, np.int64)))
    w.finish()
    w.close()
    return path


def blobs(n=90, d=12, classes=3, signal=2.5, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    X = rng.standard_normal((n, d))
    X[:, 3] += signal * y
    return X, y


# ---------------------------------------------------------------- splits ---------------------------------------------


def test_split_is_stratified_disjoint_and_seeded():
    y = np.repeat([0, 1, 2], [12, 20, 8])
    s = probes.stratified_split(y, 0.25, seed=3)
    assert np.intersect1d(s.train, s.test).size == 0
    assert np.array_equal(np.sort(np.concatenate([s.train, s.test])), np.arange(len(y)))
    assert np.bincount(y[s.test]).tolist() == [3, 5, 2]  # round(0.25 * class size)
    again = probes.stratified_split(y, 0.25, seed=3)
    assert np.array_equal(s.test, again.test)
    assert not np.array_equal(s.test, probes.stratified_split(y, 0.25, seed=4).test)


def test_test_split_never_used_for_model_selection():
    """Scrambling the test images' features changes neither the chosen C nor the CV scores."""
    X, y = blobs()
    split = probes.make_splits(y, 0.25, [0])
    a = probes.evaluate(X, y, split, **FAST)
    X2 = X.copy()
    X2[split[0].test] = np.random.default_rng(9).standard_normal((len(split[0].test), X.shape[1])) * 50
    b = probes.evaluate(X2, y, split, **FAST)
    assert b["C_per_seed"] == a["C_per_seed"] and b["cv_accuracy_mean"] == a["cv_accuracy_mean"]
    assert b["accuracy_mean"] != a["accuracy_mean"]  # the scrambled test images were scored


# ---------------------------------------------------------------- linear probe ---------------------------------------


def test_linear_probe_cv_matches_an_independent_grid_search():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = blobs(n=60, signal=1.5)
    p = probes.LinearProbe(Cs=[0.01, 1.0, 100.0], cv=3, seed=5).fit(X, y)
    folds = StratifiedKFold(3, shuffle=True, random_state=5).split(X, y)
    naive = np.zeros((3, 3))
    for j, (tr, va) in enumerate(folds):
        for i, C in enumerate([0.01, 1.0, 100.0]):
            m = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000)).fit(X[tr], y[tr])
            naive[i, j] = m.score(X[va], y[va])
    assert np.abs(p.cv_scores_ - naive).max() <= 1 / 20 + 1e-9  # warm starts: at most one of 20 images differs
    assert p.C_ == [0.01, 1.0, 100.0][int(np.argmax(naive.mean(1)))]
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=p.C_, max_iter=5000)).fit(X, y)
    assert np.mean(p.predict(X) == ref.predict(X)) >= 0.95
    assert p.score(X, y) > 0.6  # chance is 1/3


def test_probe_beats_chance_on_signal_and_not_on_noise():
    X, y = blobs(n=120, signal=3.0)
    splits = probes.make_splits(y, 0.25, [0, 1, 2])
    sig = probes.evaluate(X, y, splits, **FAST)
    assert sig["accuracy_mean"] > sig["chance_mean"] + 0.4
    noise = probes.evaluate(np.random.default_rng(1).standard_normal(X.shape), y, splits, **FAST)
    assert noise["accuracy_mean"] < sig["accuracy_mean"] - 0.3
    assert 0 <= sig["macro_f1_mean"] <= 1 and sig["accuracy_std"] >= 0 and len(sig["accuracy_per_seed"]) == 3


def test_same_seed_same_results_other_seed_other_split():
    X, y = blobs()
    a = probes.evaluate(X, y, probes.make_splits(y, 0.25, [7]), **FAST)
    b = probes.evaluate(X, y, probes.make_splits(y, 0.25, [7]), **FAST)
    assert a == b
    assert probes.sparse_probing(X, y, probes.make_splits(y, 0.25, [7]), k_max=2, **FAST) == \
        probes.sparse_probing(X, y, probes.make_splits(y, 0.25, [7]), k_max=2, **FAST)


def test_macro_f1_and_chance_by_hand():
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 1, 1, 1, 0])
    # class 0: P=1/2 R=1/2 F=1/2; class 1: P=2/3 R=1 F=0.8; class 2: F=0
    assert probes.macro_f1(y_true, y_pred) == pytest.approx((0.5 + 0.8 + 0) / 3)
    assert probes.chance_accuracy(np.array([1, 1, 0]), y_true) == pytest.approx(2 / 5)


# ---------------------------------------------------------------- k-sparse -------------------------------------------


def test_mean_difference_scores_by_hand():
    X = np.array([[1.0, 0.0, 5.0], [3.0, 0.0, 5.0], [0.0, 4.0, 5.0], [0.0, 2.0, 5.0]])
    y = np.array([0, 0, 1, 1])
    # class means: feature0 2 vs 0, feature1 0 vs 3, feature2 5 vs 5
    assert probes.mean_difference_scores(X, y) == pytest.approx([2.0, 3.0, 0.0])
    X3 = np.array([[6.0], [0.0], [0.0], [0.0], [3.0], [3.0]])
    y3 = np.array([0, 1, 1, 2, 2, 2])
    # one-vs-rest gaps: c0 |6 - 6/5| = 4.8, c1 |0 - 12/4| = 3, c2 |2 - 2| = 0
    assert probes.mean_difference_scores(X3, y3) == pytest.approx([4.8])
    assert probes.top_k_features(np.array([1.0, 3.0, 3.0, 0.5]), 2).tolist() == [1, 2]
    assert probes.default_ks(20) == [1, 2, 4, 8, 16] and probes.default_ks(100, 8) == [1, 2, 4, 8]


def test_k_sparse_probe_recovers_a_planted_latent():
    rng = np.random.default_rng(0)
    n, d = 200, 64
    y = rng.integers(0, 2, n)
    Z = np.maximum(rng.standard_normal((n, d)), 0) * (rng.random((n, d)) < 0.1)  # sparse noise codes
    Z[:, 17] = (y == 1) * (1.0 + rng.random(n))  # the one latent that carries the label
    p = probes.KSparseProbe(1, **FAST).fit(Z[:150], y[:150])
    assert p.features_.tolist() == [17]
    assert p.score(Z[150:], y[150:]) == 1.0
    curve = probes.sparse_probing(Z, y, probes.make_splits(y, 0.25, [0, 1]), ks=[1, 4], **FAST)
    assert [r["k"] for r in curve] == [1, 4] and curve[0]["accuracy_mean"] == 1.0


def test_k_sparse_probe_finds_one_latent_per_class():
    rng = np.random.default_rng(1)
    y = np.arange(150) % 3
    Z = np.maximum(rng.standard_normal((150, 40)), 0) * 0.3
    for c, j in zip(range(3), [5, 22, 31]):
        Z[:, j] = (y == c) * 2.0
    p = probes.KSparseProbe(3, **FAST).fit(Z, y)
    assert sorted(p.features_.tolist()) == [5, 22, 31]
    with pytest.raises(ProbeError, match="k must lie in"):
        probes.KSparseProbe(41, **FAST).fit(Z, y)


# ---------------------------------------------------------------- errors ---------------------------------------------


def test_clear_errors_for_bad_labels_and_inputs():
    X = np.zeros((6, 3))
    with pytest.raises(ProbeError, match="no labels"):
        probes.LinearProbe().fit(X, -np.ones(6, dtype=int))
    with pytest.raises(ProbeError, match="single class"):
        probes.LinearProbe().fit(X, np.zeros(6, dtype=int))
    with pytest.raises(ProbeError, match="2-D"):
        probes.LinearProbe().fit(np.zeros(6), np.arange(6) % 2)
    with pytest.raises(ProbeError, match="samples but y has"):
        probes.LinearProbe().fit(X, np.arange(5) % 2)
    with pytest.raises(ProbeError, match="cv >= 2 or a single C"):  # checked by fit (scikit-learn's rule)
        probes.LinearProbe(Cs=[1, 10], cv=None).fit(X, np.arange(6) % 2)
    with pytest.raises(ProbeError, match="not fitted"):
        probes.LinearProbe().predict(X)
    with pytest.raises(ProbeError, match="fewer than 3"):
        probes.stratified_split(np.array([0, 0, 0, 1, 1, 1, 2]), 0.25, 0)
    fitted = probes.LinearProbe(Cs=[1.0], cv=None).fit(*blobs(n=30))
    with pytest.raises(ProbeError, match="LinearProbe is expecting 12 features"):
        fitted.predict(np.zeros((2, 5)))


def test_store_errors_no_labels_single_class_missing_key(tmp_path):
    acts = {("mid_block", 25): np.random.default_rng(0).standard_normal((12, 4))}
    with open_store(make_store(tmp_path / "nolabel.h5", acts, -np.ones(12, dtype=int))) as st:
        with pytest.raises(ProbeError, match="has no labels"):
            probes.sweep(st, progress=False)
    with open_store(make_store(tmp_path / "one.h5", acts, np.zeros(12, dtype=int))) as st:
        with pytest.raises(ProbeError, match="single class"):
            probes.sweep(st, progress=False)
    with open_store(make_store(tmp_path / "ok.h5", acts, np.arange(12) % 2)) as st:
        with pytest.raises(KeyError, match="mid_block"):
            probes.sweep(st, keys=[("up_blocks.9", 25)], progress=False)
        with pytest.raises(KeyError, match=r"timesteps \[25\]"):
            probes.sweep(st, keys=[("mid_block", 999)], progress=False)


# ---------------------------------------------------------------- store sweep and streaming -------------------------


def test_sweep_over_store_keys_with_baselines(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    good = rng.standard_normal((60, 8))
    good[:, 0] += 4 * y
    acts = {("a", 10): good, ("a", 500): rng.standard_normal((60, 8)), ("b", 10): rng.standard_normal((60, 16))}
    with open_store(make_store(tmp_path / "s.h5", acts, y)) as st:
        recs, ctx = probes.sweep(st, baselines={"pixels": rng.standard_normal((60, 30))}, seeds=[0, 1],
                                 progress=False, **FAST)
    by = {(r["features"], r["hook"], r["timestep"]): r for r in recs}
    assert set(by) == {("raw", "a", 10), ("raw", "a", 500), ("raw", "b", 10), ("pixels", "pixels", None),
                       ("random", "random-8", None), ("random", "random-16", None)}
    assert by[("raw", "a", 10)]["accuracy_mean"] > 0.85
    assert by[("raw", "a", 500)]["accuracy_mean"] < 0.75
    assert by[("random", "random-16", None)]["d"] == 16
    assert ctx["n_images"] == 60 and len(ctx["splits"]) == 2


def test_random_features_by_hand():
    X = np.array([[0.0, 2.0], [2.0, 0.0]])
    R = probes.random_features(X, 3, seed=4)
    rng = np.random.default_rng(4)
    W, b = rng.standard_normal((2, 3)) / np.sqrt(2), rng.standard_normal(3)
    Xs = np.array([[-1.0, 1.0], [1.0, -1.0]])  # standardised columns
    assert R == pytest.approx(np.maximum(Xs @ W + b, 0), abs=1e-6)
    assert np.array_equal(R, probes.random_features(X, 3, seed=4))


def test_streaming_moments_match_numpy(tmp_path):
    x = np.random.default_rng(0).standard_normal((37, 5, 2, 3)) * 3 + 1
    path = make_store(tmp_path / "m.h5", {("h", 1): x}, np.arange(37) % 2, layout="NCHW", spatial=(2, 3))
    rows = np.arange(2, 37)
    src = probes.StoreSource(path, "h", 1, rows, samples="tokens", chunk_images=8)
    mean, std, n = probes.streaming_moments(src)
    tok = x[rows].reshape(len(rows), 5, -1).transpose(0, 2, 1).reshape(-1, 5)
    assert n == len(rows) * 6
    assert mean == pytest.approx(tok.mean(0), abs=1e-5) and std == pytest.approx(tok.std(0), abs=1e-5)
    pooled = probes.streaming_moments(probes.StoreSource(path, "h", 1, rows, chunk_images=8))
    assert pooled[0] == pytest.approx(x[rows].mean(axis=(2, 3)).mean(0), abs=1e-5)


def test_streaming_probe_learns_and_is_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    n = 90
    y = np.arange(n) % 3
    x = rng.standard_normal((n, 6, 2, 2)).astype(np.float32)
    x[:, 2] += 2.5 * y[:, None, None]  # channel 2 carries the class at every position
    path = make_store(tmp_path / "t.h5", {("h", 5): x}, y, layout="NCHW", spatial=(2, 2))
    split = probes.stratified_split(y, 0.25, 0)
    kw = dict(weight_decays=[1e-4, 1e-1], epochs=6, batch_size=32, lr=0.05, seed=0, threads=1)
    for samples in ("pooled", "tokens"):
        src = probes.StoreSource(path, "h", 5, np.arange(n), samples=samples, chunk_images=16)
        p = probes.StreamingLinearProbe(**kw).fit(src.subset(split.train), y[split.train])
        acc = p.score(src.subset(split.test), y[split.test])
        assert acc >= 0.85, (samples, acc)
        assert p.val_scores_.shape == (2,) and p.weight_decay_ in (1e-4, 1e-1)
    again = probes.StreamingLinearProbe(**kw).fit(src.subset(split.train), y[split.train])
    assert np.array_equal(again.bank_.W.detach().numpy(), p.bank_.W.detach().numpy())
    with pytest.raises(ProbeError, match="samples must be one of"):
        probes.StoreSource(path, "h", 5, np.arange(n), samples="pixels")


# ---------------------------------------------------------------- monosemanticity ------------------------------------


def test_auroc_matrix_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    X = np.round(rng.standard_normal((40, 5)), 1)  # ties included
    y = rng.integers(0, 3, 40)
    A = probes.auroc_matrix(X, y)
    for c in range(3):
        for j in range(5):
            assert A[c, j] == pytest.approx(roc_auc_score(y == c, X[:, j]))


def test_top_rows_matches_a_full_sort():
    X = np.random.default_rng(0).standard_normal((50, 7))
    assert np.array_equal(probes.top_rows(X, 6), np.argsort(-X, axis=0)[:6])
    assert np.array_equal(probes.top_rows(X[:4], 6), np.argsort(-X[:4], axis=0))
    A = probes.auroc_matrix(X, np.arange(50) % 3, block=3)
    assert np.allclose(A, probes.auroc_matrix(X, np.arange(50) % 3))


def test_purity_entropy_by_hand():
    p, h = probes.label_purity_entropy(np.array([0, 0, 1, 2]), 3)
    assert p == 0.5 and h == pytest.approx(1.5)  # -(.5 log .5 + 2 * .25 log .25)
    assert probes.label_purity_entropy(np.array([1, 1]), 3) == (1.0, 0.0)


def test_monosemanticity_ranks_the_planted_latent_first():
    rng = np.random.default_rng(0)
    y = np.arange(120) % 4
    Z = np.maximum(rng.standard_normal((120, 20)), 0) * (rng.random((120, 20)) < 0.3)
    Z[:, 9] = (y == 2) * (1 + rng.random(120))
    Z[:, 4] = 0.0  # dead
    rep = probes.monosemanticity(Z, y, top_n=10, class_names=["a", "b", "c", "d"])
    first = rep["latents"][0]
    assert first["latent"] == 9 and first["purity"] == 1.0 and first["entropy_bits"] == 0
    assert first["best_class"] == "c" and first["auroc"] == 1.0 and first["frequency"] == pytest.approx(0.25)
    assert first["purity_shuffled"] < 1.0
    dead = next(r for r in rep["latents"] if r["latent"] == 4)
    assert dead["dead"] and np.isnan(dead["purity"]) and dead["rank"] == 19
    s = rep["summary"]
    assert s["dead_fraction"] == pytest.approx(1 / 20) and s["best_latent_per_class"]["c"] == 9
    assert s["max_entropy_bits"] == pytest.approx(2.0)


@pytest.mark.parametrize("samples", ["pooled", "tokens"])
def test_sae_codes_match_direct_encoding(tmp_path, samples):
    import torch

    import sae

    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 6, 2, 3)).astype(np.float32)
    path = make_store(tmp_path / "s.h5", {("h", 7): x}, np.arange(10) % 2, layout="NCHW", spatial=(2, 3))
    m = sae.SparseAutoencoder(6, 24, 3, seed=1)
    m.init_from_data(torch.from_numpy(x.mean(axis=(2, 3))))
    m = sae.load(sae.save(m, tmp_path / "sae", extra={"hook": "h", "timestep": 7, "samples": samples}))
    rows = np.array([1, 2, 5, 8])
    with open_store(path) as st:
        codes, freq = probes.sae_codes(st, m, rows, batch_size=3)
    with torch.no_grad():
        if samples == "pooled":
            z = m.encode(torch.from_numpy(x[rows].mean(axis=(2, 3)))).numpy()
            expect = z
        else:
            tok = x[rows].reshape(4, 6, 6).transpose(0, 2, 1).reshape(-1, 6)
            z = m.encode(torch.from_numpy(np.ascontiguousarray(tok))).numpy()
            expect = z.reshape(4, 6, 24).mean(axis=1)
    assert codes == pytest.approx(expect, abs=1e-5)
    assert freq == pytest.approx((z > 0).mean(axis=0))
    bad = sae.load(sae.save(sae.SparseAutoencoder(5, 8, 2), tmp_path / "bad", extra={"hook": "h", "timestep": 7}))
    with open_store(path) as st, pytest.raises(ProbeError, match="d_in=5"):
        probes.sae_codes(st, bad, rows)


# ---------------------------------------------------------------- grid pooling ----------------------------------------


def test_grid_pooling_matches_torch_adaptive_pool(tmp_path):
    import torch

    rng = np.random.default_rng(0)
    maps = rng.standard_normal((6, 3, 7, 5)).astype(np.float32)  # 7x5: cells of unequal, overlapping sizes
    tokens = rng.standard_normal((6, 12, 4)).astype(np.float32)  # NTC on a 3x4 grid
    y = np.arange(6) % 2
    path = make_store(tmp_path / "m.h5", {("u", 1): maps}, y, layout="NCHW", spatial=(7, 5))
    tpath = make_store(tmp_path / "t.h5", {("d", 1): tokens}, y, layout="NTC", spatial=(3, 4))
    with open_store(path) as st:
        for g in (1, 2, 3):
            want = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(maps), g).flatten(1).numpy()
            np.testing.assert_allclose(st.pooled("u", 1, grid=g, batch_size=4), want, rtol=1e-5, atol=1e-6)
    with open_store(tpath) as st:
        grid_maps = torch.from_numpy(tokens).reshape(6, 3, 4, 4).permute(0, 3, 1, 2)  # row-major tokens -> (C, h, w)
        want = torch.nn.functional.adaptive_avg_pool2d(grid_maps, 2).flatten(1).numpy()
        np.testing.assert_allclose(st.pooled("d", 1, grid=2), want, rtol=1e-5, atol=1e-6)
    with open_store(make_store(tmp_path / "nc.h5", {("p", 1): rng.standard_normal((6, 4))}, y)) as st:
        with pytest.raises(ValueError, match="pooling: none"):
            st.pooled("p", 1, grid=2)


def test_grid_probe_reads_layout_the_mean_loses(tmp_path):
    # the label is WHERE a blob sits (left or right half); every map has the same spatial mean
    rng = np.random.default_rng(1)
    n = 60
    y = np.arange(n) % 2
    maps = 0.1 * rng.standard_normal((n, 2, 4, 4)).astype(np.float32)
    maps[y == 0, 0, :, :2] += 1.0
    maps[y == 1, 0, :, 2:] += 1.0
    with open_store(make_store(tmp_path / "lr.h5", {("u", 1): maps}, y, layout="NCHW", spatial=(4, 4))) as st:
        mean = probes.sweep(st, seeds=[0], progress=False, random_baseline=False, **FAST)[0][0]
        grid = probes.sweep(st, seeds=[0], progress=False, random_baseline=False, grid=2, **FAST)[0][0]
    assert grid["grid"] == 2 and grid["d"] == 2 * 4 and mean["d"] == 2
    assert grid["accuracy_mean"] == 1.0 and mean["accuracy_mean"] < 0.8


# ---------------------------------------------------------------- scikit-learn estimator contract --------------------

from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

# Checks that do not apply, and why. Only this one: integer label -1 means "unlabelled image" in an
# activation store (probes.labelled_rows), so a probe refuses it rather than learning it as a class;
# check_classifiers_classes trains on the labels {-1, 1}.
PROBE_EXPECTED_FAILURES = {
    "check_classifiers_classes": "label -1 means 'unlabelled' in Revelio stores and is refused on purpose",
}

# Small settings so the ~55 checks per estimator stay quick; cv=3 keeps the C path's selection in play.
_CHECKED = [probes.LinearProbe(Cs=[0.1, 1.0], cv=3, max_iter=200), probes.KSparseProbe(k=2, Cs=[1.0], cv=None)]


@parametrize_with_checks(_CHECKED, expected_failed_checks=lambda est: PROBE_EXPECTED_FAILURES)
def test_probes_pass_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_probes_clone_and_grid_search():
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV

    X, y = blobs(n=60)
    lin = probes.LinearProbe(Cs=(0.01, 1.0), cv=3, seed=4)
    twin = clone(lin)
    assert twin.get_params() == lin.get_params() and twin.Cs == (0.01, 1.0)  # parameters kept as given
    ks = clone(probes.KSparseProbe(k=3, Cs=[1.0], cv=None))
    assert ks.get_params()["k"] == 3
    gs = GridSearchCV(probes.KSparseProbe(Cs=[1.0], cv=None), {"k": [1, 2, 4]}, cv=3).fit(X, y)
    assert gs.best_params_["k"] in (1, 2, 4) and len(gs.cv_results_["mean_test_score"]) == 3
    assert gs.best_estimator_.features_.shape == (gs.best_params_["k"],)
    gl = GridSearchCV(probes.LinearProbe(cv=None), {"Cs": [[0.001], [1.0]]}, cv=3).fit(X, y)
    assert gl.score(X, y) == pytest.approx(gl.best_estimator_.score(X, y))
    with pytest.raises(ProbeError, match="k must be a positive"):  # bad parameters fail in fit, not __init__
        clone(probes.KSparseProbe(k=0)).fit(X, y)


def _two_colour_image() -> np.ndarray:
    """(1, 4, 4, 3): left half pure red (1, 0, 0), right half (0.5, 0.5, 1.0)."""
    img = np.zeros((1, 4, 4, 3))
    img[:, :, :2] = [1.0, 0.0, 0.0]
    img[:, :, 2:] = [0.5, 0.5, 1.0]
    return img


def test_mean_colour_by_hand_and_on_the_store_grid():
    img = _two_colour_image()
    assert probes.mean_colour(img) == pytest.approx(np.array([[0.75, 0.25, 0.5]]))
    # 2x2 grid, channel-major like the store's (C, g, g) flattening: R of the 4 cells, then G, then B
    g = probes.mean_colour(img, grid=2)
    assert g == pytest.approx(np.array([[1, 0.5, 1, 0.5, 0, 0.5, 0, 0.5, 0, 1, 0, 1]]))
    # the cells are the store's adaptive grid: same numbers as _grid_pool on the (n, 3, H, W) image
    from extraction.store import _grid_pool

    rng = np.random.default_rng(0)
    x = rng.random((3, 7, 7, 3))
    assert probes.mean_colour(x, 3) == pytest.approx(_grid_pool(x.transpose(0, 3, 1, 2), 3), abs=1e-6)
    with pytest.raises(ProbeError, match="grid"):
        probes.mean_colour(img, grid=5)


def test_colour_histogram_of_a_two_colour_image():
    img = _two_colour_image()
    h = probes.colour_histogram(img, bins=4)[0]
    assert h.shape == (12,)
    # R: half the pixels at 1.0 (last bin), half at 0.5 (bin 2); G: half 0 (bin 0), half 0.5 (bin 2);
    # B: half 0 (bin 0), half 1.0 (bin 3)
    assert h == pytest.approx([0, 0, .5, .5, .5, 0, .5, 0, .5, 0, 0, .5])
    j = probes.colour_histogram(img, bins=2, joint=True)[0]
    # joint bins (r, g, b) with index (r*2 + g)*2 + b: red = (1, 0, 0) -> 4, (0.5, 0.5, 1) -> (1, 1, 1) -> 7
    assert j == pytest.approx([0, 0, 0, 0, .5, 0, 0, .5])
    # grid 2: the two left cells hold only red
    c = probes.colour_histogram(img, bins=2, grid=2).reshape(6, 2, 2)
    assert c[:, :, 0] == pytest.approx(np.array([[0, 0], [1, 1], [1, 1], [0, 0], [1, 1], [0, 0]]))


def test_colour_histogram_matches_a_naive_loop():
    rng = np.random.default_rng(1)
    x = rng.random((2, 6, 5, 3))
    x[0, 0, 0] = [1.0, 0.0, 0.999]  # edges of the range
    bins, grid = 3, 2
    got = probes.colour_histogram(x, bins, grid).reshape(2, 3 * bins, grid, grid)
    gotj = probes.colour_histogram(x, bins, grid, joint=True).reshape(2, bins ** 3, grid, grid)
    for n in range(2):
        for i, (r0, r1) in enumerate([(0, 3), (3, 6)]):
            for j, (c0, c1) in enumerate([(0, 3), (2, 5)]):  # adaptive: 5 columns -> 0..3, 2..5
                want, wantj = np.zeros(3 * bins), np.zeros(bins ** 3)
                cnt = 0
                for r in range(r0, r1):
                    for c in range(c0, c1):
                        b = [min(int(v * bins), bins - 1) for v in x[n, r, c]]
                        for ch in range(3):
                            want[ch * bins + b[ch]] += 1
                        wantj[(b[0] * bins + b[1]) * bins + b[2]] += 1
                        cnt += 1
                assert got[n, :, i, j] == pytest.approx(want / cnt)
                assert gotj[n, :, i, j] == pytest.approx(wantj / cnt)


def test_neuron_purity_matches_a_naive_loop():
    # the model's own channels as latents (dense: every image counts, negative activations included)
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 40)
    X = rng.standard_normal((40, 5))
    X[:, 1] = np.where(y == 2, 3.0, -1.0) + 0.1 * rng.standard_normal(40)
    X[:, 3] -= 10.0  # a channel that is negative everywhere is not "dead" as a neuron
    rep = probes.monosemanticity(X, y, top_n=6, dense=True)
    by = {r["latent"]: r for r in rep["latents"]}
    for j in range(5):
        top = sorted(range(40), key=lambda i: -X[i, j])[:6]
        counts = np.bincount(y[top], minlength=3)
        assert by[j]["purity"] == pytest.approx(counts.max() / 6) and not by[j]["dead"]
        assert sorted(by[j]["top_images"]) == sorted(top)
    assert by[1]["purity"] == 1.0 and by[1]["dominant_class"] == "2"
    assert rep["summary"]["dead_fraction"] == 0.0 and "2" in rep["summary"]["classes_purity_ge_0.9"]
    # as SAE codes (firing = > 0) the all-negative channel would be dead
    assert next(r for r in probes.monosemanticity(X, y, top_n=6)["latents"] if r["latent"] == 3)["dead"]


def test_baseline_verdict_says_which_baseline_wins():
    def rec(features, hook, acc, t=None):
        return {"features": features, "hook": hook, "timestep": t, "probe": "linear", "accuracy_mean": acc,
                "accuracy_std": 0.01, "chance_mean": 0.2}

    recs = [rec("raw", "a", 0.8, 25), rec("raw", "b", 0.7, 25), rec("pixels", "pixels", 0.6),
            rec("histogram", "histogram", 0.85), rec("mean_colour", "mean_colour", 0.5)]
    v = probes.baseline_verdict(recs)
    assert v["best"]["hook"] == "a" and v["strongest"] == "histogram" and not v["wins"]
    assert v["margin"] == pytest.approx(-0.05) and v["baselines"]["pixels"]["margin"] == pytest.approx(0.2)
    assert not v["level"]  # 0.05 is beyond the seeds' spread (0.01)
    v = probes.baseline_verdict(recs[:3])
    assert v["wins"] and v["strongest"] == "pixels" and v["margin"] == pytest.approx(0.2)
    v = probes.baseline_verdict([rec("raw", "a", 0.8, 25), rec("histogram", "histogram", 0.795)])
    assert v["wins"] and v["level"]  # +0.005 inside a 0.01 std: level, not a win
    assert probes.baseline_verdict(recs[2:]) is None


def test_sweep_per_label_reads_features_once_with_the_same_results(tmp_path):
    rng = np.random.default_rng(3)
    y = np.arange(48) % 3
    other = (np.arange(48) // 3) % 4
    other[:2] = 3  # ... and class 0 of `other` left with fewer images is dropped, rows realigned
    acts = {("a", 10): rng.standard_normal((48, 6)) + other[:, None], ("b", 10): rng.standard_normal((48, 4))}
    with open_store(make_store(tmp_path / "s.h5", acts, y)) as st:
        plain = probes.sweep(st, seeds=[0], labels=other, progress=False, min_class_images=12, **FAST)[0]
        cache = {}
        probes.sweep(st, seeds=[0], cache=cache, progress=False, **FAST)
        assert set(cache) == {("pooled", "a", 10, 1), ("pooled", "b", 10, 1)}
        again = probes.sweep(st, seeds=[0], labels=other, cache=cache, progress=False, min_class_images=12, **FAST)[0]
    assert again == plain and again[0]["n_classes"] == 3
    with pytest.raises(ValueError, match="labels has 5 entries"):
        with open_store(tmp_path / "s.h5") as st:
            probes.sweep(st, labels=np.zeros(5, int), progress=False, **FAST)
