"""The config of ``revelio zoo train`` (light: no torch, so ``revelio zoo train --help`` starts at once)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import field

ALL_STAGES = ["vae", "tiny-sd", "tiny-flux"]  # what model=all trains
STAGES = ALL_STAGES + ["tiny-sd3"]  # tiny-sd3: only on request (no long run yet)
TRAIN_CONFIG_FILE = "revelio_train.json"  # the training config, saved beside each trained pipeline
DEFAULT_HOLDOUT = ["red circle", "green square", "blue triangle", "yellow diamond", "purple cross", "orange star"]


@dataclass
class StageConfig:
    """Optimisation settings of one model."""

    steps: int = field(2000, min=1, help="optimizer steps")
    batch_size: int = field(32, min=1, help="images per step")
    lr: float = field(5e-4, above=0, help="AdamW learning rate (linear warm-up, then constant; see decay_from_step)")
    warmup_steps: int = field(0, min=0, help="steps of the linear learning-rate warm-up (0: 5% of steps); set it "
                                             "to extend a run's steps without changing its first steps")
    multi_from_step: int = field(0, min=0, help="denoisers: from this optimizer step on, batches come from the "
                                                "second image set (multi_images): a curriculum from mostly one "
                                                "object to several (0: never)")
    multi_origin_step: int = field(0, min=0, help="the step the second set's batch order counts its epochs from "
                                                  "(0: multi_from_step)")
    uniform_times_from_step: int = field(0, min=0, help="rectified-flow denoisers (tiny-flux, tiny-sd3): from this "
                                                        "step on, noise levels s are uniform in [0, 1] instead of "
                                                        "logit-normal (more weight on nearly clean and pure-noise "
                                                        "inputs; 0: never)")
    time_shift: float = field(1.0, above=0, help="rectified-flow denoisers: from time_shift_from_step on, noise levels "
                                                 "s are shifted towards pure noise, s -> k s / (1 + (k - 1) s) with k "
                                                 "this shift (SD3's resolution shift; 1: none)")
    time_shift_from_step: int = field(0, min=0, help="the step time_shift starts at (0: from the first step)")
    decay_from_step: int = field(0, min=0, help="from this step on the learning rate falls linearly to 0 at `steps` "
                                                "(0: constant after the warm-up)")
    heads: int = field(0, min=0, help="tiny-flux: attention heads of head_dim dims (width head_dim x heads; 0: the "
                                      "builder's default, 2)")
    head_dim: int = field(0, min=0, help="tiny-flux: dims per attention head, 32, 24, 20 or 16 (0: 32); the width is "
                                         "head_dim x heads (builders.build_tiny_flux)")
    layers: int = field(0, min=0, help="tiny-flux: double-stream blocks (0: the builder's default, 4)")
    single_layers: int = field(-1, min=-1, help="tiny-flux: single-stream blocks (-1: the builder's default, 2)")
    vae_factor: int = field(0, min=0, help="tiny-flux: downsampling factor of the VAE it denoises in: 4 (the VAE "
                                           "shared with tiny-sd: 8 x 8 tokens of 8x8 pixels), 2 (its own VAE, "
                                           "trained first: 16 x 16 tokens of 4x4 pixels) or 8 (its own: 4 x 4 "
                                           "tokens of 16x16 pixels); 0: 4")
    vae_channels: int = field(0, min=0, help="tiny-flux: latent channels of its VAE (0: 4, the shared VAE's); a VAE "
                                             "other than factor 4 with 4 channels is tiny-flux's own, trained first "
                                             "(e.g. vae_factor 8, vae_channels 16: FLUX.1's VAE layout, 4 x 4 tokens "
                                             "of 16x16 pixels, 64 numbers each)")
    adaln_zero: bool = field(False, help="tiny-flux: start from adaLN-Zero (DiT): every adaptive norm's modulation and "
                                          "the output projection zeroed, so each block starts as the identity "
                                          "(builders.zero_init_modulation); only a run from step 0 is affected")
    teacher: str = field("", help="tiny-flux: a trained tiny-sd pipeline folder on the same VAE (e.g. "
                                  "revelio/zoo/weights/tiny-sd): from teacher_from_step on, its denoised prediction "
                                  "of each noisy latent replaces the training image in the velocity target "
                                  "(distillation; noise levels it cannot express keep the image); '': none")
    teacher_from_step: int = field(0, min=0, help="tiny-flux: the step the teacher target starts at (0: the first)")
    init_from: str = field("", help="tiny-flux: a pipeline folder (e.g. the shipped tiny-flux) whose transformer and "
                                    "text encoders start a run at step 0 instead of the seeded random init; '': none")
    qk_scale: float = field(1.0, above=0, help="tiny-flux: start every attention's RMSNorm of queries and keys with "
                                                "weights sqrt(qk_scale) instead of 1, so attention logits start "
                                                "qk_scale times larger (builders.scale_qk_norms): with 32-dim heads "
                                                "RMS-normalised queries and keys bound a logit by sqrt(32) = 5.7 at "
                                                "weights 1 (qk_scale 4 left the loss and shapes unchanged, "
                                                "docs/zoo.md); 1: diffusers' init")
    pooled_text: bool = field(True, help="tiny-flux: the pooled CLIP vector modulates every block with the noise "
                                          "level (FLUX.1); false: its projection is zeroed and frozen "
                                          "(builders.drop_pooled_text), so the prompt reaches the image only through "
                                          "joint attention, as SD's only path is cross-attention")
    train_text: bool = field(True, help="denoisers: train the text encoders with the denoiser (false: keep them at "
                                         "their seeded random init, frozen, as FLUX.1 and SD keep their pretrained "
                                         "T5 / CLIP). Trained jointly, tiny-flux's T5 moved captions that differ in "
                                         "colour 4.6x further apart than at init and those that differ in shape "
                                         "not at all (quality.word_separation; docs/zoo.md, fifteenth session)")
    ema_decay: float = field(0.995, help="decay of the exponential moving average whose weights are saved")
    max_minutes: float = field(0.0, help="stop after this many minutes of this process (0: none), writing a checkpoint "
                                         "that resume continues from")


@dataclass
class ZooTrainConfig:
    """Which models to train, on which shapes images, and where to save them."""

    model: Literal["vae", "tiny-sd", "tiny-flux", "tiny-sd3", "all"] = field("all", help="vae | tiny-sd | tiny-flux | tiny-sd3 | all (vae, tiny-sd, tiny-flux; "
                                   "vae first: the denoisers need it)")
    out: str = field("revelio/zoo/weights", help="folder receiving tiny-sd/ and tiny-flux/ (save_pretrained)")
    seed: int = field(0, help="seed of data, initialisation, noise and batching")
    images: int = field(10000, min=1, help="training images rendered into the tensor cache")
    upright: bool = field(False, help="render the training images with every object upright (shapes' rotate=False; "
                                      "the same layouts otherwise); false: random rotations, as the shapes world")
    single_fraction: float = field(0.5, help="share of training images holding one object (the rest 1-3)")
    multi_images: int = field(20000, min=1, help="images of the curriculum's second set (1-3 objects each, a third "
                                                 "each; their own seed stream, holdout kept); see <stage>.multi_from_step")
    holdout: list[str] = field(default_factory=lambda: list(DEFAULT_HOLDOUT),
                               help="'colour shape' pairs kept out of every training image")
    caption_dropout: float = field(0.1, help="probability of training on the empty caption (classifier-free guidance)")
    kl_weight: float = field(5e-4, help="VAE: weight of the KL term per latent element (vs per-pixel MSE)")
    vae_crop: int = field(32, help="VAE: side of the random training crops (the VAE is convolutional; 64 = whole images)")
    vae_full_from: float = field(1.0, help="VAE: share of the steps after which whole 64x64 images replace the crops "
                                           "(1: never)")
    edge_weight: float = field(0.0, help="VAE: weight of an L1 loss on horizontal and vertical image differences "
                                         "(sharp outlines, e.g. star points)")
    min_snr_gamma: float = field(0.0, help="tiny-sd: min-SNR-gamma loss weighting min(SNR, gamma)/SNR of the epsilon "
                                           "loss (0: plain MSE)")
    vae: StageConfig = field(default_factory=lambda: StageConfig(steps=800, batch_size=16, lr=2e-3, ema_decay=0.99), help="")
    sd: StageConfig = field(default_factory=lambda: StageConfig(steps=1800, batch_size=32, lr=8e-4), help="")
    flux: StageConfig = field(default_factory=lambda: StageConfig(steps=4500, batch_size=32, lr=5e-4), help="")
    sd3: StageConfig = field(default_factory=lambda: StageConfig(steps=4500, batch_size=32, lr=5e-4), help="")
    threads: int = field(1, help="torch CPU threads (0: torch's default)")
    device: str = field("cpu", help="training device: cpu | cuda | mps")
    save_dtype: Literal["float16", "float32"] = field("float16", help="storage dtype of the saved weights: float16 | float32")
    workdir: str | None = field(None, help="folder of the rendered-image and latent caches (default: $REVELIO_HOME/zoo-train)")
    checkpoint_dir: str | None = field(None, help="folder of the trained VAE and of each stage's resumable checkpoint "
                                                  "<stage>.ckpt (default: <workdir>/checkpoints)")
    checkpoint_every: int = field(500, min=0, help="write the stage checkpoint every this many steps (0: only when a stage stops)")
    resume: bool = field(False, help="continue each stage from its checkpoint in checkpoint_dir (if there is one)")
    log_every: int = field(100, help="print the step, mean loss and speed every this many steps (0: never)")
    export_checkpoint: str | None = field(None, help="no training: save the EMA weights of this training checkpoint of "
                                                     "`model` (tiny-sd, tiny-flux, tiny-sd3) as its pipeline in "
                                                     "out/<model>, in save_dtype, with this config at the "
                                                     "checkpoint's step (how a run is shipped before it ends)")
