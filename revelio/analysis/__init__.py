"""Analysis of SAE features: where latents fire, how they align with saliency maps, a feature browser, steering.

* ``feature_maps``: (d_sae, h, w) maps per image, from a store or live from a pipeline;
* ``metrics``: IoU at a threshold, Pearson correlation, AUROC of maps against a reference;
* ``alignment``: per-concept ranking of latents against saliency maps and masks (``revelio compare``);
* ``stats`` and ``browser``: per-latent statistics and the feature browser (``revelio browse``);
* ``steering``: add or remove a latent's decoder direction during generation (``revelio steer``).
"""

from .alignment import AlignmentTable, SaliencyMaps, align_store
from .browser import FeatureBrowser
from .feature_maps import OnTheFly, store_feature_maps, store_samples
from .stats import LatentStats, latent_stats
from .steering import Steering, SteeringSpec, steer

__all__ = ["AlignmentTable", "FeatureBrowser", "LatentStats", "OnTheFly", "SaliencyMaps", "Steering", "SteeringSpec",
           "align_store", "latent_stats", "steer", "store_feature_maps", "store_samples"]
