"""The k-sparse autoencoder, in plain torch (docs/methods.md, section 4).

    x_n   = s * x                                   input normalisation, s = sqrt(d_in) / mean ||x||
    pre   = (x_n - b_dec) W_enc + b_enc             W_enc [d_in, d_sae]
    z     = ReLU(TopK(pre))                         TopK per sample, or BatchTopK over the batch
    x_hat = z W_dec + b_dec                         W_dec [d_sae, d_in], rows of unit norm

Timestep-aware (``timestep_conditioning="scale_bias"``, an SAE over several timesteps t_0..t_{T-1}):
the encoder pre-activations of a sample of timestep index i are modulated before the selection,

    pre_i = pre * scale[i] + bias[i]                scale, bias [T, d_sae], init 1 and 0

so the SAE starts as the pooled one; dictionary, encoder and decoder stay shared across timesteps.

Codes travel as a CSR triple (values, latents, offsets): row b owns
``values[offsets[b]:offsets[b+1]]``. Decoding is an ``embedding_bag`` over the active latents,
and the encoder's backward touches only the selected (row, latent) pairs, so neither pass
multiplies a dense (batch x d_sae) matrix by the dictionary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import (ARCHITECTURES, ENCODER_INITS, TIMESTEP_CONDITIONINGS, Architecture, EncoderInit, SAEConfig,
                     TimestepConditioning)


@dataclass
class Codes:
    """Sparse codes of a batch in CSR form (values already through the ReLU)."""

    values: Tensor  # (nnz,)
    latents: Tensor  # (nnz,) long
    offsets: Tensor  # (B,) long, start of each row
    rows: Tensor  # (nnz,) long, row of each entry

    def dense(self, batch: int, d_sae: int) -> Tensor:
        """The (B, d_sae) matrix with zeros off the active latents."""
        out = self.values.new_zeros(batch, d_sae)
        return out.index_put_((self.rows, self.latents), self.values)

    def l0(self, batch: int) -> Tensor:
        """Mean number of non-zero codes per sample (counted on the codes, not on pre-activations)."""
        return (self.values > 0).sum().float() / batch


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: sum (x - x_hat)^2 / sum (x - mean(x))^2 over the batch."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def geometric_median(x: Tensor, iters: int = 100, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows of x."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(eps)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() < eps * (1 + m.norm()):
            m = new
            break
        m = new
    return m.float()


class _SelectedPreacts(torch.autograd.Function):
    """pre[rows, latents] with a backward that only touches the selected encoder rows.

    pre = (x_n - b_dec) W_enc + b_enc is computed densely without autograd; the gradients are
    those of its selected entries. With G the sparse (B x d_sae) matrix of their gradients:
    dW_enc^T = G^T (x_n - b_dec) costs O(nnz * d_in) instead of O(B * d_sae * d_in), db_enc is the
    per-latent sum g of G, and db_dec = -W_enc g is one mat-vec (no (B x d_in) product).
    """

    @staticmethod
    def forward(ctx, xn: Tensor, b_dec: Tensor, W_rows: Tensor, b_enc: Tensor, pre: Tensor, rows: Tensor,
                latents: Tensor) -> Tensor:
        ctx.save_for_backward(xn - b_dec, W_rows, rows, latents)
        return pre[rows, latents]

    @staticmethod
    def backward(ctx, grad: Tensor):
        xc, W_rows, rows, latents = ctx.saved_tensors
        gb = grad.new_zeros(W_rows.shape[0]).index_add_(0, latents, grad)
        G = torch.sparse_coo_tensor(torch.stack([rows, latents]), grad, (xc.shape[0], W_rows.shape[0]),
                                    check_invariants=False)
        gx = torch.sparse.mm(G, W_rows) if ctx.needs_input_grad[0] else None  # only if the inputs need one
        gbd = -(gb @ W_rows) if ctx.needs_input_grad[1] else None
        gW = torch.sparse.mm(G.t(), xc) if ctx.needs_input_grad[2] else None
        return gx, gbd, gW, gb if ctx.needs_input_grad[3] else None, None, None, None


def _topk_select(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample TopK: (rows, latents, offsets) of the k largest pre-activations of each row."""
    B = pre.shape[0]
    k = min(k, pre.shape[1])
    latents = pre.topk(k, dim=1, sorted=False).indices.flatten()
    rows = torch.arange(B, device=pre.device).repeat_interleave(k)
    return rows, latents, torch.arange(B, device=pre.device) * k


def _rows_to_offsets(rows: Tensor, batch: int) -> Tensor:
    counts = torch.bincount(rows, minlength=batch)
    return torch.cumsum(counts, 0) - counts


def _batch_topk_select(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """BatchTopK: the k*B largest pre-activations over the whole batch, sorted by row."""
    B, d = pre.shape
    flat = pre.flatten().topk(min(k * B, B * d), sorted=False).indices.sort().values
    rows, latents = flat // d, flat % d
    return rows, latents, _rows_to_offsets(rows, B)


def _threshold_select(pre: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """BatchTopK at inference: every pre-activation above the learned threshold."""
    rows, latents = (pre > threshold).nonzero(as_tuple=True)
    return rows, latents, _rows_to_offsets(rows, pre.shape[0])


class SparseAutoencoder(nn.Module):
    """TopK / BatchTopK sparse autoencoder with optional Matryoshka prefixes and AuxK.

    Args:
        d_in: activation width.
        d_sae: dictionary size.
        k: active latents per sample (on average per sample for BatchTopK).
        architecture: "topk" or "batchtopk".
        matryoshka: increasing prefix sizes; each prefix must reconstruct on its own (d_sae is added).
        k_aux: latents of the AuxK loss (default d_in // 2).
        aux_coef: weight of the AuxK loss (1/32 in Gao et al.).
        dead_after: samples without firing after which a latent counts as dead.
        encoder_init: the encoder's starting scale. All three start tied (each encoder row parallel to
            its unit decoder row, b_enc = 0). "lstsq": rows of the one length that minimises the first
            reconstruction error on the ``init_from_data`` sample (a closed form: the TopK choice does not
            depend on that length); "unit": rows of unit norm (W_enc = W_dec^T); "sparsify": EleutherAI
            sparsify's init, encoder rows drawn as ``nn.Linear``'s default (uniform in +-1/sqrt(d_in),
            norm about 0.58) and the decoder their normalised copy.
        timesteps: the timesteps the SAE is trained on (recorded; the order defines the timestep index).
        timestep_conditioning: "none" (one SAE for all timesteps) or "scale_bias": a learned per-timestep
            scale and bias of every latent's pre-activation (``t_scale``, ``t_bias`` [T, d_sae], starting at
            1 and 0). On the pre-activations rather than the input: the scale of a latent's activation and
            the level it must pass to win the TopK differ between timesteps (activation norms change along
            the denoising trajectory), while the feature directions (decoder rows) and the encoder stay one
            set for all timesteps, so a latent means the same thing at every t. Encoding then needs the
            timestep of each sample (``timestep=`` a value, or ``t_index=`` an index into ``timesteps``).
    """

    def __init__(self, d_in: int, d_sae: int, k: int, architecture: Architecture = "topk",
                 matryoshka: list[int] | tuple[int, ...] = (), k_aux: int | None = None,
                 aux_coef: float = 1 / 32, dead_after: int = 10_000_000, seed: int = 0,
                 encoder_init: EncoderInit = "lstsq", timesteps: list[int] | tuple[int, ...] | None = None,
                 timestep_conditioning: TimestepConditioning = "none"):
        super().__init__()
        if timestep_conditioning not in TIMESTEP_CONDITIONINGS:
            raise ValueError(f"timestep_conditioning {timestep_conditioning!r} is not one of "
                             f"{list(TIMESTEP_CONDITIONINGS)}")
        self.timesteps = [int(t) for t in timesteps] if timesteps else []
        if len(set(self.timesteps)) != len(self.timesteps):
            raise ValueError(f"timesteps {self.timesteps} name a timestep twice")
        if timestep_conditioning != "none" and not self.timesteps:
            raise ValueError(f"timestep_conditioning {timestep_conditioning!r} needs the list of timesteps")
        self.timestep_conditioning = timestep_conditioning
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {architecture!r} is not one of {list(ARCHITECTURES)}")
        if encoder_init not in ENCODER_INITS:
            raise ValueError(f"encoder_init {encoder_init!r} is not one of {list(ENCODER_INITS)}")
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
        # the settings as one SAEConfig, resolved (k_aux, prefixes); ``from_config`` keeps its training keys too
        self.config = SAEConfig(d_sae=d_sae, k=k, architecture=architecture, matryoshka=list(matryoshka), k_aux=k_aux,
                                aux_coef=aux_coef, dead_after=dead_after, encoder_init=encoder_init,
                                timestep_conditioning=timestep_conditioning).resolved(d_in)
        prefixes = self.config.matryoshka
        if prefixes[0] <= 0 or prefixes[-1] != d_sae:
            raise ValueError(f"matryoshka prefixes must lie in [1, d_sae={d_sae}], got {list(matryoshka)}")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.architecture = architecture
        self.prefixes = prefixes
        self.k_aux = self.config.k_aux
        self.aux_coef = aux_coef
        self.dead_after = dead_after
        self.encoder_init = encoder_init
        g = torch.Generator().manual_seed(seed)
        if encoder_init == "sparsify":
            bound = 1 / math.sqrt(d_in)  # nn.Linear's default (Kaiming-uniform, a = sqrt(5))
            W_enc_rows = (torch.rand(d_sae, d_in, generator=g) * 2 - 1) * bound
            W_dec = W_enc_rows / W_enc_rows.norm(dim=1, keepdim=True)
        else:
            W_dec = torch.randn(d_sae, d_in, generator=g)
            W_dec /= W_dec.norm(dim=1, keepdim=True)
            W_enc_rows = W_dec.clone()  # tied: W_enc = W_dec^T (rescaled from data by "lstsq")
        self.W_dec = nn.Parameter(W_dec)
        # the encoder is stored as rows [d_sae, d_in] (so that its sparse gradient is written in place);
        # W_enc [d_in, d_sae] is the view of the equations and of the saved file
        self.W_enc_rows = nn.Parameter(W_enc_rows)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("norm_scale", torch.tensor(1.0))
        self.register_buffer("threshold", torch.tensor(-1.0))  # BatchTopK inference threshold; -1: not yet set
        self.register_buffer("since_fired", torch.zeros(d_sae, dtype=torch.long))  # samples since each latent fired
        if self.conditioned:
            self.t_scale = nn.Parameter(torch.ones(len(self.timesteps), d_sae))
            self.t_bias = nn.Parameter(torch.zeros(len(self.timesteps), d_sae))
        self.cfg: dict = {}  # filled by ``sae.load`` from cfg.json (hook, timestep, source store, ...)

    @classmethod
    def from_config(cls, d_in: int, config: SAEConfig, seed: int = 0,
                    timesteps: list[int] | tuple[int, ...] | None = None) -> SparseAutoencoder:
        """The SAE ``config`` describes, for inputs of width ``d_in``; ``.config`` is it, resolved (``sae.io.save``
        writes it to cfg.json). ``timesteps``: those it is trained on (the data's)."""
        r = config.resolved(d_in)
        model = cls(d_in, r.d_sae, r.k, r.architecture, r.matryoshka, r.k_aux, r.aux_coef, r.dead_after, seed,
                    encoder_init=r.encoder_init, timesteps=timesteps, timestep_conditioning=r.timestep_conditioning)
        model.config = r
        return model

    @property
    def conditioned(self) -> bool:
        """Whether the encoder is modulated per timestep (and so needs each sample's timestep)."""
        return self.timestep_conditioning != "none"

    def t_index(self, timestep=None, t_index=None, batch: int | None = None) -> Tensor | None:
        """Timestep indices (B,) from timestep values (an int or one per sample) or indices; None when the SAE
        is not timestep-aware (values are then only checked against ``timesteps``, when it records some)."""
        if timestep is not None and t_index is not None:
            raise ValueError("pass timestep (a value) or t_index (an index into timesteps), not both")
        if timestep is not None:
            vals = torch.as_tensor(timestep).long().flatten().cpu()
            if self.timesteps:
                lut = {t: i for i, t in enumerate(self.timesteps)}
                bad = sorted({int(v) for v in vals.tolist()} - set(lut))
                if bad and self.conditioned:
                    raise ValueError(f"timestep {bad[0]} is not one of this SAE's timesteps {self.timesteps}")
                if not self.conditioned:
                    return None
                t_index = torch.tensor([lut[int(v)] for v in vals.tolist()])
            elif not self.conditioned:
                return None
        if not self.conditioned:
            return None
        if t_index is None:
            raise ValueError(f"this SAE is timestep-aware (timesteps {self.timesteps}): pass the timestep of the "
                             "samples (timestep= a value, or t_index= an index into timesteps)")
        idx = torch.as_tensor(t_index).long().to(self.W_dec.device).flatten()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(self.timesteps)):
            raise ValueError(f"t_index must lie in [0, {len(self.timesteps)}) (timesteps {self.timesteps}), got "
                             f"{int(idx.min())}..{int(idx.max())}")
        if batch is not None and idx.numel() == 1:
            idx = idx.expand(batch)
        if batch is not None and idx.numel() != batch:
            raise ValueError(f"{idx.numel()} timestep indices for a batch of {batch} samples")
        return idx

    @property
    def W_enc(self) -> Tensor:
        """The encoder matrix [d_in, d_sae] (a view of ``W_enc_rows``)."""
        return self.W_enc_rows.t()

    # ---- initialisation from data -------------------------------------------------------
    @torch.no_grad()
    def init_from_data(self, x: Tensor, b_dec: Literal["mean", "geometric_median", "zeros"] = "mean",
                       normalize: bool = True) -> None:
        """Set the normalisation constant (mean ||x_n|| = sqrt(d_in)) and b_dec from a data sample;
        with ``encoder_init="lstsq"`` also the encoder's length (see :meth:`fit_encoder_scale`)."""
        choices = ("mean", "geometric_median", "zeros")
        if b_dec not in choices:
            raise ValueError(f"b_dec init {b_dec!r} is not one of {list(choices)}")
        x = x.float().to(self.W_dec.device)
        self.norm_scale.fill_(math.sqrt(self.d_in) / x.norm(dim=1).mean().clamp_min(1e-12).item() if normalize else 1.0)
        xn = x * self.norm_scale
        center = {"mean": lambda: xn.mean(0), "geometric_median": lambda: geometric_median(xn),
                  "zeros": lambda: torch.zeros_like(self.b_dec)}[b_dec]()
        self.b_dec.copy_(center.to(self.b_dec))
        if self.encoder_init == "lstsq":
            self.fit_encoder_scale(xn)

    @torch.no_grad()
    def fit_encoder_scale(self, xn: Tensor) -> float:
        """Rescale the encoder by the c minimising sum ||(xn - b_dec) - c * D(xn)||^2; returns c.

        With b_enc = 0 the pre-activations are linear in the encoder's scale, so the TopK (or
        BatchTopK) choice and the ReLU do not depend on it and the reconstruction without b_dec is
        c times D(xn) = ReLU(TopK(pre)) W_dec at scale 1: c = <xn - b_dec, D> / <D, D>.
        """
        if float(self.b_enc.abs().max()) != 0.0:
            raise ValueError("fit_encoder_scale needs b_enc = 0 (it is meant for the initialisation)")
        tix = None
        if self.conditioned:  # the modulation must still be the identity: any timestep index encodes alike
            if bool((self.t_scale != 1).any() or (self.t_bias != 0).any()):
                raise ValueError("fit_encoder_scale needs the timestep modulation at its identity start")
            tix = torch.zeros(xn.shape[0], dtype=torch.long, device=self.W_dec.device)
        xn = xn.to(self.W_dec)
        codes = self.encode_sparse(xn, train=True, t_index=tix)
        D = self.decode_sparse(codes, bias=False)
        c = float((xn - self.b_dec).mul(D).sum() / D.pow(2).sum().clamp_min(1e-12))
        if c > 0:
            self.W_enc_rows.mul_(c)
        return c

    # ---- decoder constraint -------------------------------------------------------------
    @torch.no_grad()
    def set_decoder_unit_norm(self) -> None:
        """Rescale every decoder row (a feature direction) to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the gradient component along each (unit) decoder row, so a step cannot change its norm to first order."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec

    # ---- encode / decode ----------------------------------------------------------------
    def _pre(self, xn: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.addmm(self.b_enc, xn - self.b_dec, self.W_enc)

    def _modulate(self, pre: Tensor, tix: Tensor | None) -> Tensor:
        """The pre-activations the selection sees: per-timestep scale and bias when timestep-aware."""
        if not self.conditioned:
            return pre
        if tix is None:
            self.t_index(batch=pre.shape[0])  # raises: the timestep is needed
        with torch.no_grad():
            return torch.addcmul(self.t_bias[tix], pre, self.t_scale[tix])

    def _select(self, pre: Tensor, train: bool) -> tuple[Tensor, Tensor, Tensor]:
        if self.architecture == "topk":
            return _topk_select(pre, self.k)
        if train or self.threshold < 0:
            return _batch_topk_select(pre, self.k)
        return _threshold_select(pre, float(self.threshold))

    def _codes(self, xn: Tensor, pre: Tensor, rows: Tensor, latents: Tensor, offsets: Tensor,
               tix: Tensor | None = None) -> Codes:
        """Codes of the selected (row, latent) pairs; ``pre`` unmodulated (the gradient into the encoder
        goes through it), the timestep scale and bias applied to the selected entries only."""
        vals = _SelectedPreacts.apply(xn, self.b_dec, self.W_enc_rows, self.b_enc, pre, rows, latents)
        if self.conditioned:
            tr = tix[rows]
            vals = vals * self.t_scale[tr, latents] + self.t_bias[tr, latents]
        return Codes(F.relu(vals), latents, offsets, rows)

    def encode_sparse(self, xn: Tensor, train: bool = False, t_index: Tensor | None = None) -> Codes:
        """Codes of already normalised inputs, in CSR form (``t_index``: timestep indices, timestep-aware SAEs)."""
        tix = self.t_index(t_index=t_index, batch=xn.shape[0]) if self.conditioned else None
        pre = self._pre(xn)
        return self._codes(xn, pre, *self._select(self._modulate(pre, tix), train), tix)

    def decode_sparse(self, codes: Codes, prefix: int | None = None, bias: bool = True) -> Tensor:
        """z W_dec (+ b_dec) from the active latents only; ``prefix`` keeps latents < prefix (Matryoshka)."""
        w = codes.values if prefix is None else codes.values * (codes.latents < prefix)
        out = F.embedding_bag(codes.latents, self.W_dec, codes.offsets, mode="sum", per_sample_weights=w)
        return out + self.b_dec if bias else out

    def encode(self, x: Tensor, timestep=None, t_index=None) -> Tensor:
        """Dense codes (B, d_sae) of raw activations (zeros off the active latents); normalises x itself.

        Timestep-aware SAEs need the samples' timestep: ``timestep`` (a value of ``timesteps``, one for all or
        one per sample) or ``t_index`` (index into ``timesteps``); other SAEs ignore both."""
        xn = x.to(self.W_enc) * self.norm_scale
        tix = self.t_index(timestep, t_index, x.shape[0])
        return self.encode_sparse(xn, t_index=tix).dense(x.shape[0], self.d_sae)

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstruction in raw activation units from dense codes (B, d_sae)."""
        return (codes @ self.W_dec + self.b_dec) / self.norm_scale

    def forward(self, x: Tensor, timestep=None, t_index=None) -> tuple[Tensor, Tensor]:
        """(x_hat, codes) for raw activations x (B, d_in); ``timestep`` / ``t_index`` as in ``encode``."""
        xn = x.to(self.W_enc) * self.norm_scale
        codes = self.encode_sparse(xn, t_index=self.t_index(timestep, t_index, x.shape[0]))
        return self.decode_sparse(codes) / self.norm_scale, codes.dense(x.shape[0], self.d_sae)

    # ---- training objective -------------------------------------------------------------
    def dead_mask(self) -> Tensor:
        return self.since_fired >= self.dead_after

    def loss(self, x: Tensor, t_index: Tensor | None = None) -> dict[str, Tensor]:
        """Training objective on raw activations x: FVU (mean over Matryoshka prefixes) + aux_coef * AuxK.

        Returns the loss and the metrics of the batch, with ``fires`` (d_sae,): how often each latent fired.
        ``t_index``: the timestep index of each sample (needed by timestep-aware SAEs, ignored otherwise).
        """
        B = x.shape[0]
        xn = x.to(self.W_enc) * self.norm_scale
        tix = self.t_index(t_index=t_index, batch=B) if self.conditioned else None
        pre = self._pre(xn)
        mpre = self._modulate(pre, tix)
        rows, latents, offsets = self._select(mpre, train=True)
        codes = self._codes(xn, pre, rows, latents, offsets, tix)
        x_hat = self.decode_sparse(codes)
        full = fvu(xn, x_hat)
        recon = full if len(self.prefixes) == 1 else torch.stack(
            [fvu(xn, self.decode_sparse(codes, m)) for m in self.prefixes[:-1]] + [full]).mean()
        auxk = self._auxk(xn, x_hat, pre, mpre, tix)
        fires = torch.bincount(codes.latents[codes.values > 0], minlength=self.d_sae)
        out = {"loss": recon + self.aux_coef * auxk, "fvu": full.detach(), "auxk": auxk.detach(),
               "l0": codes.l0(B), "fires": fires}
        if self.architecture == "batchtopk":
            out["min_active"] = codes.values[codes.values > 0].min().detach() if codes.values.gt(0).any() else None
        return out

    def _auxk(self, xn: Tensor, x_hat: Tensor, pre: Tensor, mpre: Tensor | None = None,
              tix: Tensor | None = None) -> Tensor:
        """Reconstruct the residual from the top k_aux dead latents, without b_dec (Gao et al. 2024)."""
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        if n_dead == 0:
            return xn.new_zeros(())
        masked = (pre if mpre is None else mpre).masked_fill(~dead, float("-inf"))
        rows, latents, offsets = _topk_select(masked, min(self.k_aux, n_dead))
        aux = self._codes(xn, pre, rows, latents, offsets, tix)
        residual = (xn - x_hat).detach()
        return fvu(residual, self.decode_sparse(aux, bias=False))

    @torch.no_grad()
    def update_dead_counters(self, fired: Tensor, n_samples: int) -> None:
        """Count samples since each latent last fired (``fired``: which fired in the last ``n_samples``)."""
        self.since_fired += n_samples
        self.since_fired[fired] = 0

    @torch.no_grad()
    def update_threshold(self, min_active: Tensor | None, momentum: float = 0.99) -> None:
        """BatchTopK: running mean of the smallest kept activation, the threshold used at inference."""
        if min_active is None:
            return
        if self.threshold < 0:
            self.threshold.fill_(float(min_active))
        else:
            self.threshold.mul_(momentum).add_((1 - momentum) * min_active)

    @torch.no_grad()
    def calibrate_threshold(self, x: Tensor, max_entries: int = 2**25, t_index: Tensor | None = None) -> float:
        """BatchTopK: set the inference threshold so that these raw activations get k codes per sample on average.

        The threshold is placed between the (k*n)-th and (k*n+1)-th largest pre-activations of the n
        samples (never below 0: codes pass a ReLU), so ``encode`` (pre > threshold) gives mean L0 = k on
        them. At most ``max_entries`` pre-activations are formed (n is cut to max_entries // d_sae rows).
        The running mean kept during training lags the falling activation scale; this replaces it.
        """
        if self.architecture != "batchtopk":
            raise ValueError("calibrate_threshold is for architecture 'batchtopk'")
        n = max(1, min(x.shape[0], max_entries // self.d_sae))
        xn = x[:n].to(self.W_enc) * self.norm_scale
        tix = None
        if self.conditioned:
            tix = self.t_index(t_index=t_index, batch=x.shape[0])[:n]
        pre = self._modulate(self._pre(xn), tix).flatten()
        m = min(self.k * n, pre.numel() - 1)
        top = pre.topk(m + 1).values  # sorted, descending
        t = max(0.0, float((top[m - 1] + top[m]) / 2))
        self.threshold.fill_(t)
        return t

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_sae={self.d_sae}, k={self.k}, architecture={self.architecture}, "
                f"prefixes={self.prefixes}, k_aux={self.k_aux}"
                + (f", timesteps={self.timesteps}, timestep_conditioning={self.timestep_conditioning}"
                   if self.timesteps else ""))
