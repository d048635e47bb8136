"""A linear probe streaming batches from the HDF5 store (torch + Lightning), for data that does not fit in RAM.

One pass computes the standardisation (chunked mean/variance, merged exactly), then a bank of
linear heads, one per L2 strength, trains on the same batches (their losses are independent, so
one stream trains the whole regularisation path). The strength is chosen on validation images
held out of the training images by seed; the caller's test images are never seen. Samples are
pooled image vectors (``samples="pooled"``) or every spatial position labelled with its image's
class (``samples="tokens"``; an image is then predicted from its mean position logits).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._checks import ProbeError, check_fitted, check_labels
from .features import check_finite
from .splits import stratified_split

SAMPLES = ("pooled", "tokens")


@dataclass
class StoreSource:
    """A lazy design matrix: rows (images) of one (hook, timestep) of a store, read in chunks."""

    path: str | Path
    hook: str
    timestep: int
    rows: np.ndarray
    samples: str = "pooled"
    chunk_images: int = 256

    def __post_init__(self) -> None:
        if self.samples not in SAMPLES:
            raise ProbeError(f"samples must be one of {SAMPLES}, got {self.samples!r}")
        self.rows = np.asarray(self.rows, dtype=np.int64)
        if np.any(np.diff(self.rows) <= 0):
            raise ProbeError("StoreSource rows must be increasing store row indices")

    def subset(self, positions: np.ndarray) -> StoreSource:
        """The images at ``positions`` of this source (positions into ``rows``)."""
        return StoreSource(self.path, self.hook, self.timestep, self.rows[np.sort(positions)], self.samples,
                           self.chunk_images)

    def chunks(self, order: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (samples (m, C) float32, image position (m,)) a chunk of images at a time.

        ``order`` permutes the chunks (each chunk is a block of consecutive images, read in one go).
        """
        from extraction.store import open_store

        starts = np.arange(0, len(self.rows), self.chunk_images)
        with open_store(self.path) as st:
            for s in starts if order is None else starts[order]:
                pos = np.arange(s, min(s + self.chunk_images, len(self.rows)))
                if self.samples == "pooled":
                    x = st.pooled(self.hook, self.timestep, self.rows[pos])
                    check_finite(st, self.hook, self.timestep, self.rows[pos], x)
                    yield x, pos
                else:
                    x, owner = st.tokens(self.hook, self.timestep, self.rows[pos])
                    check_finite(st, self.hook, self.timestep, self.rows[pos], x, owner)
                    yield x, pos[np.searchsorted(self.rows[pos], owner)]

    def n_chunks(self) -> int:
        return (len(self.rows) + self.chunk_images - 1) // self.chunk_images

    def width(self) -> int:
        from extraction.store import open_store

        with open_store(self.path) as st:
            return st.d_in(self.hook, self.timestep)


def streaming_moments(source: StoreSource) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, std, count) per feature over every sample of ``source``, merged chunk by chunk (Chan et al.)."""
    n, mean, m2 = 0, None, None
    for x, _ in source.chunks():
        x = x.astype(np.float64)
        nb, mb = len(x), x.mean(axis=0)
        m2b = ((x - mb) ** 2).sum(axis=0)
        if mean is None:
            n, mean, m2 = nb, mb, m2b
            continue
        delta = mb - mean
        tot = n + nb
        mean = mean + delta * nb / tot
        m2 = m2 + m2b + delta ** 2 * n * nb / tot
        n = tot
    if mean is None:
        raise ProbeError("the source holds no samples")
    return mean, np.sqrt(m2 / n), n


class _ChunkStream(torch.utils.data.IterableDataset):
    """Mini-batches (x, y) drawn from shuffled store chunks; a new seeded order every epoch."""

    def __init__(self, source: StoreSource, y: np.ndarray, batch_size: int, seed: int):
        self.source, self.y, self.batch_size, self.seed, self.epoch = source, y, batch_size, seed, 0

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        self.epoch += 1
        for x, pos in self.source.chunks(rng.permutation(self.source.n_chunks())):
            perm = rng.permutation(len(x))
            for i in range(0, len(x), self.batch_size):
                sel = perm[i:i + self.batch_size]
                yield torch.from_numpy(x[sel]), torch.from_numpy(self.y[pos[sel]])


class LinearHeadBank(nn.Module):
    """L linear classifiers on standardised inputs: logits (L, B, n_classes)."""

    def __init__(self, d: int, n_classes: int, weight_decays: Sequence[float], mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.where(std > 0, std, 1.0), dtype=torch.float32))
        self.register_buffer("weight_decays", torch.as_tensor(list(weight_decays), dtype=torch.float32))
        self.W = nn.Parameter(torch.zeros(len(weight_decays), d, n_classes))
        self.b = nn.Parameter(torch.zeros(len(weight_decays), 1, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.to(self.mean) - self.mean) / self.std
        return torch.einsum("bd,ldc->lbc", z, self.W) + self.b

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Sum over heads of mean cross-entropy + lambda_l ||W_l||^2 (heads do not interact)."""
        logits = self(x)
        L, B, C = logits.shape
        ce = nn.functional.cross_entropy(logits.reshape(L * B, C), y.repeat(L), reduction="none").view(L, B).mean(1)
        return (ce + self.weight_decays * self.W.pow(2).sum(dim=(1, 2))).sum()


def _lightning_module(bank: LinearHeadBank, lr: float):
    import lightning as L

    class _Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.bank = bank

        def training_step(self, batch, _):
            x, y = batch
            loss = self.bank.loss(x, y)
            self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(y))
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.bank.parameters(), lr=lr)

    return _Probe()


class StreamingLinearProbe:
    """Linear probe over a ``StoreSource`` (scikit-learn style: ``fit(source, y)``, ``predict``, ``score``).

    ``y`` holds one label per image of the source. ``weight_decays`` is the L2 path; one of them
    is chosen on ``val_fraction`` of the images (stratified, seeded). ``accelerator`` and
    ``precision`` go to Lightning ("cpu", "gpu", "auto"; "32-true", "bf16-mixed", ...). ``threads``
    caps torch's CPU threads during ``fit`` (restored after): small heads run several times
    faster on one thread than on contended cores.
    After ``fit``: ``classes_``, ``weight_decay_``, ``val_scores_``, ``bank_``, ``head_``.
    """

    def __init__(self, weight_decays: Sequence[float] = (1e-5, 1e-4, 1e-3, 1e-2), epochs: int = 10,
                 batch_size: int = 256, lr: float = 1e-2, val_fraction: float = 0.2, seed: int = 0,
                 accelerator: str = "cpu", precision: str = "32-true", threads: int | None = None,
                 progress: bool = False):
        if not weight_decays or min(weight_decays) < 0:
            raise ProbeError(f"weight_decays must be a non-empty list of non-negative L2 strengths, "
                             f"got {weight_decays}")
        self.weight_decays = [float(w) for w in weight_decays]
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.val_fraction, self.seed = val_fraction, seed
        self.accelerator, self.precision, self.threads, self.progress = accelerator, precision, threads, progress

    def fit(self, source: StoreSource, y: np.ndarray) -> StreamingLinearProbe:
        """Standardise, train the head bank on the training images, choose the L2 strength on held-out ones."""
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            return self._fit(source, y)
        finally:
            torch.set_num_threads(before)

    def _fit(self, source: StoreSource, y: np.ndarray) -> StreamingLinearProbe:
        import lightning as L

        y = check_labels(y, min_per_class=2 if len(self.weight_decays) > 1 else 1)
        if len(y) != len(source.rows):
            raise ProbeError(f"y has {len(y)} labels but the source has {len(source.rows)} images")
        self.classes_ = np.unique(y)
        yi = np.searchsorted(self.classes_, y)
        if len(self.weight_decays) > 1:
            split = stratified_split(yi, self.val_fraction, self.seed, min_train=1)
            train, val = split.train, split.test
        else:
            train, val = np.arange(len(y)), np.zeros(0, dtype=np.int64)
        tr_src = source.subset(train)
        mean, std, _ = streaming_moments(tr_src)
        torch.manual_seed(self.seed)
        self.bank_ = LinearHeadBank(len(mean), len(self.classes_), self.weight_decays, mean, std)
        stream = _ChunkStream(tr_src, yi[np.sort(train)], self.batch_size, self.seed)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0)
        trainer = L.Trainer(max_epochs=self.epochs, accelerator=self.accelerator, devices=1,
                            precision=self.precision, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, enable_progress_bar=self.progress)
        trainer.fit(_lightning_module(self.bank_, self.lr), loader)
        self.bank_ = self.bank_.cpu().float().eval()
        if len(val):
            logits = self._image_logits(source.subset(val))  # (L, n_val, C)
            self.val_scores_ = (logits.argmax(-1) == yi[np.sort(val)][None]).mean(axis=1)
            self.head_ = int(np.argmax(self.val_scores_))
        else:
            self.val_scores_, self.head_ = np.zeros(0), 0
        self.weight_decay_ = self.weight_decays[self.head_]
        return self

    def _image_logits(self, source: StoreSource) -> np.ndarray:
        """(L, n_images, C) logits per image: its own for pooled samples, the mean over its positions for tokens."""
        L_, C = self.bank_.W.shape[0], self.bank_.W.shape[2]
        total = np.zeros((L_, len(source.rows), C))
        count = np.zeros(len(source.rows))
        with torch.no_grad():
            for x, pos in source.chunks():
                z = self.bank_(torch.from_numpy(x)).numpy()
                for l in range(L_):
                    np.add.at(total[l], pos, z[l])
                np.add.at(count, pos, 1)
        return total / count[None, :, None]

    def decision_function(self, source: StoreSource) -> np.ndarray:
        check_fitted(self)
        if source.width() != self.bank_.W.shape[1]:
            raise ProbeError(f"the source has {source.width()} features, "
                             f"the probe was fitted on {self.bank_.W.shape[1]}")
        return self._image_logits(source)[self.head_]

    def predict(self, source: StoreSource) -> np.ndarray:
        return self.classes_[self.decision_function(source).argmax(axis=1)]

    def score(self, source: StoreSource, y: np.ndarray) -> float:
        """Image-level accuracy."""
        return float(np.mean(self.predict(source) == np.asarray(y)))


def evaluate_streaming(path: str | Path, hook: str, timestep: int, rows: np.ndarray, y: np.ndarray,
                       splits: Sequence, samples: str = "pooled", chunk_images: int = 256, **probe_kw) -> dict:
    """``evaluate``'s protocol with a ``StreamingLinearProbe`` per split (features never all in RAM)."""
    from .evaluate import chance_accuracy, macro_f1, summarise

    src = StoreSource(path, hook, int(timestep), rows, samples, chunk_images)
    per_seed = []
    for s in splits:
        probe = StreamingLinearProbe(seed=s.seed, **probe_kw).fit(src.subset(s.train), y[s.train])
        pred = probe.predict(src.subset(s.test))
        per_seed.append({"accuracy": float(np.mean(pred == y[s.test])), "macro_f1": macro_f1(y[s.test], pred),
                         "cv_accuracy": float(probe.val_scores_.max()) if probe.val_scores_.size else float("nan"),
                         "chance": chance_accuracy(y[s.train], y[s.test]), "C": probe.weight_decay_})
    rec = {"probe": f"linear-streaming-{samples}", "k": None, "d": src.width(), "n_images": int(len(y)),
           "n_train": int(len(splits[0].train)), "n_test": int(len(splits[0].test)),
           "n_classes": int(len(np.unique(y))), "n_seeds": len(splits)}
    rec.update(summarise(per_seed))
    return rec
