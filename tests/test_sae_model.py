"""SAE math on small inputs: against hand computations, naive dense implementations and a known dictionary."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.optimize import minimize

import sae
from sae import SparseAutoencoder, fvu, geometric_median
from sae.model import Codes


class SparseWorld:
    """Data made from a known dictionary: x = c D, each sample with k_true active unit features."""

    def __init__(self, d_in=32, n_feat=64, k_true=3, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        D = torch.randn(n_feat, d_in, generator=self.g)
        self.D = D / D.norm(dim=1, keepdim=True)
        self.n_feat, self.k_true = n_feat, k_true

    def batch(self, B):
        idx = torch.rand(B, self.n_feat, generator=self.g).argsort(1)[:, : self.k_true]
        c = torch.zeros(B, self.n_feat).scatter_(1, idx, torch.rand(B, self.k_true, generator=self.g) + 0.5)
        return c @ self.D


def train(m, world, steps, B=256, lr=1e-2):
    """The plain training loop (the Lightning module runs the same calls)."""
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    hist = []
    for _ in range(steps):
        out = m.loss(world.batch(B))
        opt.zero_grad()
        out["loss"].backward()
        m.remove_parallel_grads()
        opt.step()
        m.set_decoder_unit_norm()
        m.update_dead_counters(out["fires"] > 0, B)
        if m.architecture == "batchtopk":
            m.update_threshold(out["min_active"])
        hist.append({k: float(v) for k, v in out.items() if k in ("fvu", "l0", "auxk")})
    return hist


def recovery(m, world):
    """Mean over true features of the best cosine with a learned decoder row."""
    W = m.W_dec.detach()
    return float((world.D @ (W / W.norm(dim=1, keepdim=True)).T).max(1).values.mean())


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_recovers_known_dictionary(arch, one_torch_thread):
    world = SparseWorld()
    m = SparseAutoencoder(32, 128, 3, architecture=arch, dead_after=2000)
    m.init_from_data(world.batch(2048))
    hist = train(m, world, 250)
    assert recovery(m, world) >= 0.9
    first, last = np.mean([h["fvu"] for h in hist[:10]]), np.mean([h["fvu"] for h in hist[-10:]])
    assert last < 0.5 * first
    norms = m.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    x = world.batch(512)
    codes = m.encode(x)
    l0 = (codes != 0).sum(1).float()
    if arch == "topk":
        assert torch.all(l0 == 3)
    else:  # BatchTopK: k per sample on average in training, a threshold at inference
        assert all(h["l0"] == 3 for h in hist[-10:])
        assert m.threshold > 0
        assert 2 <= l0.mean() <= 4
        assert torch.all(codes[codes != 0] > m.threshold)


def test_auxk_revives_dead_latents(one_torch_thread):
    """Half the encoder starts 100x too small: those latents never win the TopK and die.

    Only AuxK (top k_aux dead latents reconstruct the residual) gives them gradient."""
    world = SparseWorld(d_in=32, n_feat=64, k_true=2, seed=1)
    dead_frac, final_fvu = {}, {}
    for coef in (0.0, 1 / 32):
        m = SparseAutoencoder(32, 64, 2, aux_coef=coef, k_aux=16, dead_after=512)
        m.init_from_data(world.batch(1024))
        with torch.no_grad():
            m.W_enc[:, 32:] *= 0.01
        hist = train(m, world, 150)
        dead_frac[coef] = float(m.dead_mask().float().mean())
        final_fvu[coef] = np.mean([h["fvu"] for h in hist[-10:]])
    assert dead_frac[0.0] >= 0.4
    assert dead_frac[1 / 32] < 0.5 * dead_frac[0.0]
    assert final_fvu[1 / 32] < final_fvu[0.0]


def test_fvu_by_hand():
    x = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    # residual^2 = 0 + 1 + 1 + 0 = 2; mean (2, 1); variance sum = 1 + 1 + 1 + 1 = 4
    assert float(fvu(x, x_hat)) == pytest.approx(0.5)


def test_geometric_median_matches_optimiser():
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.normal(size=(30, 3)), rng.normal(size=(5, 3)) + 20])  # outliers pull the mean
    ref = minimize(lambda m: np.linalg.norm(pts - m, axis=1).sum(), pts.mean(0), method="Nelder-Mead",
                   options={"xatol": 1e-9, "fatol": 1e-9, "maxiter": 20000}).x
    got = geometric_median(torch.tensor(pts, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-3)
    assert np.linalg.norm(got - pts[:30].mean(0)) < np.linalg.norm(pts.mean(0) - pts[:30].mean(0))


def test_sparse_decode_equals_dense_decode():
    torch.manual_seed(0)
    m = SparseAutoencoder(16, 64, 5)
    with torch.no_grad():
        m.b_dec.normal_()
    x = torch.randn(7, 16)
    codes = m.encode_sparse(x)
    dense = codes.dense(7, 64)
    assert torch.all((dense != 0).sum(1) <= 5)
    torch.testing.assert_close(m.decode_sparse(codes), dense @ m.W_dec + m.b_dec)
    x_hat, z = m(x)
    torch.testing.assert_close(x_hat, m.decode(z))
    torch.testing.assert_close(z, m.encode(x))


def naive_topk_sae(m, x, k):
    """Independent dense implementation: z = ReLU(TopK(pre)), x_hat = z W_dec + b_dec, all through autograd."""
    pre = (x - m.b_dec) @ m.W_enc + m.b_enc
    idx = pre.topk(k, dim=1).indices
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx)).relu()
    return z @ m.W_dec + m.b_dec


def test_gradients_match_dense_autograd():
    torch.manual_seed(1)
    m = SparseAutoencoder(12, 40, 4)
    with torch.no_grad():
        m.b_dec.normal_()
        m.b_enc.normal_()
        m.W_enc.add_(0.3 * torch.randn_like(m.W_enc))
    x = torch.randn(9, 12)
    out = m.loss(x)
    out["loss"].backward()
    ours = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    fvu(x, naive_topk_sae(m, x, 4)).backward()  # dead counters are zero: no AuxK term
    for n, p in m.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_relu_on_kept_values_and_l0_on_codes():
    m = SparseAutoencoder(4, 8, 3)
    with torch.no_grad():
        m.W_enc.zero_()
        m.b_enc.copy_(torch.tensor([-1.0, -2, 0.5, -3, -4, 2.0, -5, -6]))
    codes = m.encode(torch.randn(5, 4))
    # the top 3 are latents 5, 2, 0 but 0 is negative: ReLU zeroes it, so L0 is 2, not k
    assert torch.all((codes != 0).sum(1) == 2)
    torch.testing.assert_close(codes[0], torch.tensor([0, 0, 0.5, 0, 0, 2.0, 0, 0]))


def test_remove_parallel_grads_by_hand():
    m = SparseAutoencoder(2, 2, 1)
    with torch.no_grad():
        m.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
    m.W_dec.grad = torch.tensor([[2.0, 3.0], [1.0, 0.0]])
    m.remove_parallel_grads()
    # row 0: drop the x-component; row 1: g - (g.w) w = (1, 0) - 0.6 (0.6, 0.8)
    torch.testing.assert_close(m.W_dec.grad, torch.tensor([[0.0, 3.0], [1 - 0.36, -0.48]]))


def test_matryoshka_loss_is_mean_of_prefix_fvus():
    torch.manual_seed(2)
    m = SparseAutoencoder(8, 32, 4, matryoshka=[8, 16])
    x = torch.randn(6, 8)
    z = m.encode(x)
    parts = []
    for p in (8, 16, 32):
        zp = z.clone()
        zp[:, p:] = 0
        parts.append(fvu(x, zp @ m.W_dec + m.b_dec))
    torch.testing.assert_close(m.loss(x)["loss"], torch.stack(parts).mean())


def test_normalisation_constant_and_b_dec_init():
    x = torch.randn(100, 16) * 7 + 3
    m = SparseAutoencoder(16, 32, 2)
    m.init_from_data(x, b_dec="mean")
    assert float((x * m.norm_scale).norm(dim=1).mean()) == pytest.approx(4.0, rel=1e-4)  # sqrt(16)
    torch.testing.assert_close(m.b_dec.detach(), (x * m.norm_scale).mean(0))
    with pytest.raises(ValueError, match="geometric_median"):
        m.init_from_data(x, b_dec="median")


def test_bad_arguments_name_the_choices():
    with pytest.raises(ValueError, match="topk.*batchtopk"):
        SparseAutoencoder(4, 8, 2, architecture="jumprelu")
    with pytest.raises(ValueError, match="k must be"):
        SparseAutoencoder(4, 8, 9)


def test_export_import_roundtrip_and_saelens_formula(tmp_path):
    torch.manual_seed(3)
    m = SparseAutoencoder(10, 30, 3)
    x = torch.randn(20, 10) * 5
    m.init_from_data(x, b_dec="geometric_median")
    with torch.no_grad():
        m.b_enc.normal_()
    folder = sae.save(m, tmp_path / "sae", extra={"hook": "up_blocks.1", "timestep": 25})
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]  # SAELens 6 names
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    assert {n: tuple(t.shape) for n, t in tensors.items()} == {
        "W_enc": (10, 30), "W_dec": (30, 10), "b_enc": (30,), "b_dec": (10,)}
    cfg = json.loads((folder / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"], cfg["architecture"]) == (10, 30, 3, "topk")
    assert cfg["metadata"]["hook_name"] == "up_blocks.1" and cfg["metadata"]["timestep"] == 25
    # a SAELens-style reader applies the saved tensors to RAW activations
    W_enc, W_dec, b_enc, b_dec = (tensors[n] for n in ("W_enc", "W_dec", "b_enc", "b_dec"))
    pre = (x - b_dec) @ W_enc + b_enc
    idx = pre.topk(3, dim=1).indices
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx)).relu()
    x_hat, codes = m(x)
    torch.testing.assert_close(codes, z, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x_hat, z @ W_dec + b_dec, atol=1e-4, rtol=1e-4)
    back = sae.load(folder)
    assert back.cfg["timestep"] == 25
    torch.testing.assert_close(back(x)[0], x_hat)
    torch.testing.assert_close(back.W_dec.norm(dim=1), torch.ones(30))
    with pytest.raises(ValueError, match="d_in mismatch"):
        sae.load(folder, d_in=11)
    with pytest.raises(FileNotFoundError, match="not an SAE folder"):
        sae.load(tmp_path)


def test_codes_csr_dense():
    c = Codes(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 2, 1]), torch.tensor([0, 2]), torch.tensor([0, 0, 1]))
    torch.testing.assert_close(c.dense(2, 3), torch.tensor([[1.0, 0, 2], [0, 3, 0]]))
    assert float(c.l0(2)) == 1.5


def test_loads_a_saelens_style_topk_folder(tmp_path):
    """A folder in the pre-6 SAELens style (and Revelio's older file name ``sae.safetensors``): "standard"
    architecture with k under activation_fn_kwargs, hook at the top level."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    t = {"W_enc": torch.randn(6, 20, generator=g), "W_dec": torch.randn(20, 6, generator=g),
         "b_enc": torch.randn(20, generator=g), "b_dec": torch.randn(6, generator=g)}
    save_file(t, str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({"d_in": 6, "d_sae": 20, "architecture": "standard",
                                                   "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4},
                                                   "hook_name": "blocks.3.hook_resid_post"}))
    m = sae.load(tmp_path)
    x = torch.randn(5, 6, generator=g)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    idx = pre.topk(4, dim=1).indices
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx)).relu()
    torch.testing.assert_close(m.encode(x), z)
    torch.testing.assert_close(m(x)[0], z @ t["W_dec"] + t["b_dec"])
    assert m.cfg["hook"] == "blocks.3.hook_resid_post"


def test_older_revelio_folder_still_loads(tmp_path):
    """A folder of format_version 1: ``sae.safetensors``, hook only at the top level, s folded in."""
    torch.manual_seed(4)
    m = SparseAutoencoder(6, 12, 2)
    x = torch.randn(9, 6) * 3
    m.init_from_data(x)
    s = float(m.norm_scale)
    from safetensors.torch import save_file

    save_file({"W_enc": (m.W_enc.detach() * s).contiguous(), "W_dec": (m.W_dec.detach() / s).contiguous(),
               "b_enc": m.b_enc.detach().contiguous(), "b_dec": (m.b_dec.detach() / s).contiguous()},
              str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "format_version": 1, "d_in": 6, "d_sae": 12, "k": 2, "architecture": "topk", "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 2}, "apply_b_dec_to_input": True, "normalize_activations": "none",
        "norm_scale": s, "norm_folded": True, "threshold": -1.0, "hook": "mid_block", "hook_name": "mid_block",
        "timestep": 25}))
    back = sae.load(tmp_path)
    assert (back.cfg["hook"], back.cfg["timestep"]) == ("mid_block", 25)
    torch.testing.assert_close(back(x)[0], m(x)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.encode(x), m.encode(x), atol=1e-5, rtol=1e-5)


# ---- the real SAELens package (the ``saelens`` extra, installed by ``make test``) -------------------------------
def _saelens():
    from sae_lens import SAE  # noqa: F401  (a missing extra fails here, by name)
    import sae_lens

    return sae_lens


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_saelens_loads_revelio_folder_and_agrees(tmp_path, arch):
    """``SAE.load_from_disk`` of SAELens 6 reads a Revelio folder: same codes and reconstruction on the same inputs,
    the hook under metadata.hook_name; a BatchTopK SAE comes back as SAELens's jumprelu with its threshold."""
    sl = _saelens()
    torch.manual_seed(7)
    m = SparseAutoencoder(12, 48, 4, architecture=arch)
    x = torch.randn(64, 12) * 4 + 1
    m.init_from_data(x, b_dec="mean")
    with torch.no_grad():
        m.b_enc.normal_(0, 0.3)
        if arch == "batchtopk":
            m.threshold.fill_(0.4)
    folder = sae.save(m, tmp_path / "sae", extra={"hook": "up_blocks.1", "timestep": 25, "model": "tiny-sd"})
    theirs = sl.SAE.load_from_disk(str(folder))
    assert type(theirs).__name__ == {"topk": "TopKSAE", "batchtopk": "JumpReLUSAE"}[arch]
    assert theirs.cfg.metadata.hook_name == "up_blocks.1" and theirs.cfg.metadata.model_name == "tiny-sd"
    with torch.no_grad():
        z_theirs, z_ours = theirs.encode(x), m.encode(x)
        assert (z_ours > 0).sum(1).float().mean() > 1  # codes that are not trivially empty
        torch.testing.assert_close(z_theirs, z_ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.decode(z_ours), m.decode(z_ours), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(x), m(x)[0], atol=1e-5, rtol=1e-5)


def test_revelio_loads_saelens_saved_folders_with_their_hook(tmp_path):
    """Folders written by SAELens's own ``save_model`` (TopK, and a jumprelu with one threshold, as SAELens
    exports BatchTopK): ``sae.load`` gives the same encode/decode and the hook from metadata.hook_name."""
    sl = _saelens()
    from sae_lens.saes.sae import SAEMetadata

    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, 10, generator=g) * 2
    for name, cls, cfg_cls, kw in (("topk", sl.TopKSAE, sl.TopKSAEConfig, {"k": 3}),
                                   ("topk_nobdec", sl.TopKSAE, sl.TopKSAEConfig, {"k": 3, "apply_b_dec_to_input": False}),
                                   ("jumprelu", sl.JumpReLUSAE, sl.JumpReLUSAEConfig, {})):
        theirs = cls(cfg_cls(d_in=10, d_sae=40, metadata=SAEMetadata(hook_name=f"blocks.2.{name}"), **kw))
        with torch.no_grad():
            for p in theirs.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            if name == "jumprelu":
                theirs.threshold.fill_(0.3)
        theirs.save_model(str(tmp_path / name))
        assert (tmp_path / name / "sae_weights.safetensors").exists()
        ours = sae.load(tmp_path / name)
        assert ours.cfg["hook"] == f"blocks.2.{name}"
        assert ours.architecture == {"topk": "topk", "topk_nobdec": "topk", "jumprelu": "batchtopk"}[name]
        with torch.no_grad():
            z = theirs.encode(x)
            assert (z > 0).any()
            torch.testing.assert_close(ours.encode(x), z, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ours.decode(z), theirs.decode(z), atol=1e-5, rtol=1e-5)
        # and the round trip: Revelio re-saves it, SAELens reads it back to the same SAE
        again = sl.SAE.load_from_disk(str(sae.save(ours, tmp_path / f"{name}_again", extra=ours.cfg)))
        with torch.no_grad():
            torch.testing.assert_close(again.encode(x), z, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        theirs.threshold[3] = 2.0
    theirs.save_model(str(tmp_path / "per_latent"))
    with pytest.raises(ValueError, match="per-latent thresholds"):
        sae.load(tmp_path / "per_latent")




def test_batchtopk_threshold_calibration_gives_k_per_sample(one_torch_thread):
    """The calibrated threshold sits between the (k n)-th and (k n + 1)-th largest pre-activations:
    exactly k codes per sample on average on the calibration data, about k on fresh data."""
    world = SparseWorld()
    m = SparseAutoencoder(32, 128, 3, architecture="batchtopk", dead_after=2000)
    m.init_from_data(world.batch(2048))
    train(m, world, 100)
    x = world.batch(4096)
    t = m.calibrate_threshold(x)
    pre = ((x * m.norm_scale - m.b_dec) @ m.W_enc + m.b_enc).detach()  # naive dense pre-activations
    assert int((pre > t).sum()) == 3 * len(x)
    assert float((m.encode(x) != 0).sum(1).float().mean()) == pytest.approx(3.0)
    fresh = (m.encode(world.batch(4096)) != 0).sum(1).float().mean()
    assert abs(float(fresh) - 3) <= 0.05 * 3
    with pytest.raises(ValueError, match="batchtopk"):
        SparseAutoencoder(8, 16, 2).calibrate_threshold(x[:, :8])


@pytest.mark.parametrize("init", ["lstsq", "unit", "sparsify"])
def test_encoder_inits(init):
    """All inits are tied in direction; "lstsq" picks the length with the least first reconstruction error."""
    world = SparseWorld()
    x = world.batch(2048)
    m = SparseAutoencoder(32, 128, 3, encoder_init=init, seed=2)
    m.init_from_data(x)
    W_enc, W_dec = m.W_enc.detach().T, m.W_dec.detach()
    torch.testing.assert_close(W_enc / W_enc.norm(dim=1, keepdim=True), W_dec)
    torch.testing.assert_close(W_dec.norm(dim=1), torch.ones(128))
    norms = W_enc.norm(dim=1)
    if init == "unit":
        torch.testing.assert_close(norms, torch.ones(128))
    elif init == "sparsify":  # nn.Linear's default: uniform in +-1/sqrt(d_in), rows of norm about sqrt(1/3)
        assert W_enc.abs().max() <= 32 ** -0.5 and abs(float(norms.mean()) - 3 ** -0.5) < 0.05
    else:  # one common length c, the least-squares optimum: a brute-force scan finds nothing better
        c = float(norms.mean())
        torch.testing.assert_close(norms, torch.full((128,), c))
        xn = x * m.norm_scale

        def err(scale):
            with torch.no_grad():
                m.W_enc_rows.mul_(scale)
                e = float(fvu(xn, m.decode_sparse(m.encode_sparse(xn))))
                m.W_enc_rows.div_(scale)
            return e

        best = err(1.0)
        assert all(err(s) >= best - 1e-6 for s in (0.5, 0.8, 0.95, 1.05, 1.25, 2.0))
    with pytest.raises(ValueError, match="encoder_init"):
        SparseAutoencoder(8, 16, 2, encoder_init="xavier")


# ---- timestep-aware SAEs (issue 19) ---------------------------------------------------------------------------


def _timestep_sae(seed=3, d_in=12, d_sae=40, k=4, init_x=None):
    torch.manual_seed(seed)
    m = SparseAutoencoder(d_in, d_sae, k, timesteps=[25, 250, 500], timestep_conditioning="scale_bias")
    if init_x is not None:
        m.init_from_data(init_x, b_dec="mean")
    with torch.no_grad():
        m.b_dec.normal_()
        m.b_enc.normal_()
        m.W_enc.add_(0.3 * torch.randn_like(m.W_enc))
    return m


def test_timestep_modulation_starts_as_the_pooled_sae():
    """scale 1 and bias 0 at init: same codes, loss and gradients of the shared weights as the plain SAE."""
    torch.manual_seed(0)
    plain = SparseAutoencoder(12, 40, 4, seed=5)
    cond = SparseAutoencoder(12, 40, 4, seed=5, timesteps=[25, 250], timestep_conditioning="scale_bias")
    x = torch.randn(32, 12) * 3
    tix = torch.randint(0, 2, (32,))
    for m in (plain, cond):
        m.init_from_data(x, b_dec="mean")
    torch.testing.assert_close(cond.encode(x, t_index=tix), plain.encode(x))
    a, b = plain.loss(x), cond.loss(x, t_index=tix)
    torch.testing.assert_close(a["loss"], b["loss"])
    a["loss"].backward()
    b["loss"].backward()
    for n, p in plain.named_parameters():
        torch.testing.assert_close(dict(cond.named_parameters())[n].grad, p.grad, msg=n)


def naive_modulated_sae(m, x, tix, k):
    """Dense reference: pre = ((x - b_dec) W_enc + b_enc) * scale[t] + bias[t], z = ReLU(TopK(pre))."""
    pre = ((x - m.b_dec) @ m.W_enc + m.b_enc) * m.t_scale[tix] + m.t_bias[tix]
    idx = pre.topk(k, dim=1).indices
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx)).relu()
    return z @ m.W_dec + m.b_dec, z


def test_timestep_modulation_gradients_match_dense_autograd():
    m = _timestep_sae()
    with torch.no_grad():
        m.t_scale.uniform_(0.5, 1.5)
        m.t_bias.normal_(0, 0.3)
    x, tix = torch.randn(9, 12), torch.tensor([0, 1, 2, 2, 1, 0, 0, 2, 1])
    out = m.loss(x, t_index=tix)
    out["loss"].backward()
    ours = {n: p.grad.clone() for n, p in m.named_parameters()}
    assert set(ours) >= {"t_scale", "t_bias"} and float(ours["t_scale"].abs().sum()) > 0
    m.zero_grad()
    x_hat, z = naive_modulated_sae(m, x, tix, 4)
    fvu(x, x_hat).backward()  # dead counters are zero: no AuxK term
    for n, p in m.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    with torch.no_grad():  # and the codes: the same latents and values, by value or by index of the timestep
        torch.testing.assert_close(m.encode(x, t_index=tix), z)
        torch.testing.assert_close(m.encode(x, timestep=torch.tensor([25, 250, 500])[tix]), z)
        torch.testing.assert_close(m.encode(x[:3], timestep=250), naive_modulated_sae(m, x[:3], tix[:3] * 0 + 1, 4)[1])


def test_timestep_aware_encode_needs_a_known_timestep():
    m = _timestep_sae()
    x = torch.randn(4, 12)
    with pytest.raises(ValueError, match=r"timestep-aware \(timesteps \[25, 250, 500\]\): pass the timestep"):
        m.encode(x)
    with pytest.raises(ValueError, match=r"timestep 30 is not one of this SAE's timesteps \[25, 250, 500\]"):
        m.encode(x, timestep=30)
    with pytest.raises(ValueError, match=r"t_index must lie in \[0, 3\)"):
        m.encode(x, t_index=3)
    with pytest.raises(ValueError, match="needs the list of timesteps"):
        SparseAutoencoder(12, 40, 4, timestep_conditioning="scale_bias")
    with pytest.raises(ValueError, match="timestep_conditioning 'film' is not one of"):
        SparseAutoencoder(12, 40, 4, timesteps=[1, 2], timestep_conditioning="film")
    plain = SparseAutoencoder(12, 40, 4, timesteps=[25, 250])  # pooled: the timestep is not needed, and ignored
    torch.testing.assert_close(plain.encode(x, timestep=999), plain.encode(x))


def test_timestep_aware_roundtrip_and_what_saelens_reads(tmp_path):
    """The folder holds t_scale / t_bias and the timesteps; sae.load gives the same codes at every t. SAELens
    reads the base tensors only: its codes are the unmodulated SAE's (the folder says it is not a SAELens SAE)."""
    x = torch.randn(64, 12) * 4 + 1
    m = _timestep_sae(init_x=x)
    with torch.no_grad():
        m.t_scale.uniform_(0.5, 1.5)
        m.t_bias.normal_(0, 0.3)
    folder = sae.save(m, tmp_path / "sae", extra={"hook": "up_blocks.1", "timestep": 25, "model": "tiny-sd"})
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["timesteps"] == [25, 250, 500] and cfg["timestep_conditioning"] == "scale_bias"
    assert cfg["timestep"] == 25 and cfg["saelens_compatible"] is False and "t_scale" in cfg["saelens_note"]
    t = load_file(str(folder / "sae_weights.safetensors"))
    assert t["t_scale"].shape == t["t_bias"].shape == (3, 40)
    back = sae.load(folder)
    assert back.timesteps == [25, 250, 500] and back.conditioned
    for v in (25, 250, 500):
        torch.testing.assert_close(back.encode(x, timestep=v), m.encode(x, timestep=v), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back(x, timestep=v)[0], m(x, timestep=v)[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="Unexpected key.*t_bias"):  # SAELens refuses it rather than misread it
        _saelens().SAE.load_from_disk(str(folder))
    base = SparseAutoencoder(12, 40, 4)  # the base tensors alone: the SAE without its modulation
    base.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("t_")})
    with torch.no_grad():
        assert not torch.allclose(base.encode(x), m.encode(x, timestep=250), atol=1e-3)
    sae.save(back, tmp_path / "again", extra=back.cfg)  # a loaded folder saved again keeps its timesteps
    assert json.loads((tmp_path / "again" / "cfg.json").read_text())["timesteps"] == [25, 250, 500]
    del t["t_bias"]
    from safetensors.torch import save_file

    save_file(t, str(folder / "sae_weights.safetensors"))
    with pytest.raises(sae.io.SAEFileError, match="lacks tensor 't_bias'"):
        sae.load(folder)
    pooled = SparseAutoencoder(12, 40, 4, timesteps=[25, 250])
    cfg2 = json.loads((sae.save(pooled, tmp_path / "pooled") / "cfg.json").read_text())
    assert cfg2["timesteps"] == [25, 250] and cfg2["timestep_conditioning"] == "none"
    assert "saelens_compatible" not in cfg2


def test_timestep_aware_batchtopk_threshold_calibrates_on_modulated_preacts():
    """BatchTopK with scale_bias: the calibrated threshold gives mean L0 = k on the calibration samples with
    their timesteps, and training batches select k * B codes over the modulated pre-activations."""
    x = torch.randn(256, 12) * 2
    torch.manual_seed(4)
    m = SparseAutoencoder(12, 48, 4, architecture="batchtopk", timesteps=[25, 250], timestep_conditioning="scale_bias")
    m.init_from_data(x, b_dec="mean")
    with torch.no_grad():
        m.t_scale[1].mul_(3.0)  # t = 250 pre-activations three times larger: more of its codes pass the threshold
    tix = torch.arange(256) % 2
    m.calibrate_threshold(x, t_index=tix)
    m.eval()
    z = m.encode(x, t_index=tix)
    assert float((z > 0).sum(1).float().mean()) == pytest.approx(4, abs=0.02)
    assert float((z[tix == 1] > 0).sum(1).float().mean()) > float((z[tix == 0] > 0).sum(1).float().mean())
    assert float(m.loss(x, t_index=tix)["l0"]) == pytest.approx(4, abs=0.02)


# ---- the SAE's config: one dataclass, also cfg.json -----------------------------------------------------------
def test_config_is_cfg_json_and_reads_back(tmp_path):
    """``SAEConfig`` -> model -> folder -> ``SAEConfig``: cfg.json records the resolved config (architecture under
    ``revelio_architecture``, SAELens's ``architecture`` beside it) and ``load`` gives it back."""
    from sae.config import SAEConfig

    cfg = SAEConfig(expansion=3, k=4, architecture="batchtopk", matryoshka=[10], aux_coef=0.1, dead_after=500,
                    encoder_init="unit", lr=1e-3, warmup_steps=7, decay_fraction=0.5, hist_every=0, init_samples=64,
                    b_dec_init="mean", normalize=False)
    m = SparseAutoencoder.from_config(8, cfg, seed=1)
    assert (m.d_sae, m.k, m.architecture, m.prefixes, m.k_aux, m.encoder_init) == (24, 4, "batchtopk", [10, 24], 4,
                                                                                  "unit")
    want = SAEConfig(**{**cfg.__dict__, "d_sae": 24, "k_aux": 4, "matryoshka": [10, 24]})
    assert m.config == cfg.resolved(8) == want and want.resolved(8) == want  # resolving twice changes nothing
    folder = sae.save(m, tmp_path / "sae", extra={"hook": "mid_block", "timestep": 25})
    raw = json.loads((folder / "cfg.json").read_text())
    assert raw["revelio_architecture"] == "batchtopk" and raw["architecture"] == "topk"  # no threshold yet: SAELens topk
    assert raw["matryoshka_prefixes"] == [10, 24] and raw["lr"] == 1e-3 and raw["d_sae"] == 24
    assert SAEConfig.from_cfg_json(raw) == want
    back = sae.load(folder)
    assert back.config == want and back.prefixes == [10, 24] and back.encoder_init == "unit"


def test_config_of_older_folders_keeps_defaults(tmp_path):
    """A cfg.json without the config's training keys (format 1, SAELens) reads back with their defaults."""
    from sae.config import SAEConfig

    old = {"format_version": 1, "d_in": 6, "d_sae": 12, "k": 2, "architecture": "topk", "k_aux": None,
           "matryoshka_prefixes": None, "aux_coef": 0.05, "norm_scale": 1.0, "hook": "mid_block"}
    got = SAEConfig.from_cfg_json(old)
    assert (got.d_sae, got.k, got.aux_coef, got.k_aux, got.matryoshka, got.lr) == (12, 2, 0.05, None, [], None)
    assert got.architecture == "topk" and got.warmup_steps == SAEConfig().warmup_steps
    m = SparseAutoencoder(6, 12, 2)
    sae.save(m, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    for key in ("expansion", "lr", "warmup_steps", "hist_every", "b_dec_init"):  # write the new keys, then drop them
        cfg.pop(key)
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    assert sae.load(tmp_path / "s").config == SAEConfig(d_sae=12, k=2).resolved(6)


def test_module_and_cli_use_the_one_config():
    """The Lightning module takes the config (or its keys, as before) and keeps flat hyper-parameters; the CLI's
    model section is the class itself."""
    import typing

    from revelio.commands.sae import SAEFitConfig
    from sae.config import SAEConfig
    from sae.lightning import SAEModule

    assert typing.get_type_hints(SAEFitConfig)["model"] is SAEConfig
    a = SAEModule(16, SAEConfig(expansion=2, k=3, lr=0.01))
    b = SAEModule(d_in=16, expansion=2, k=3, lr=0.01)
    assert a.config == b.config == a.sae.config and a.config.d_sae == 32 and a.lr == b.lr == 0.01
    assert a.hparams["k"] == 3 and a.hparams["d_in"] == 16 and "timesteps" in a.hparams
    with pytest.raises(TypeError, match="SAEConfig keys expansion, d_sae, k"):
        SAEModule(16, expanson=2)
    with pytest.raises(TypeError, match="not both"):
        SAEModule(16, SAEConfig(), k=3)
