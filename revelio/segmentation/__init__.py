"""Zero-shot segmentation from saliency maps: data loaders, the paper's metrics and the evaluation loop."""

from .data import DATASETS, ImageNetSegmentation, PascalVOC, SegSample, ShapesSegmentation, fit_labels
from .evaluate import BACKGROUND_WORDS, METHODS, evaluate, format_table
from .metrics import EVAL_SIZE, BinaryScores, MultiClassScores

__all__ = ["SegSample", "ImageNetSegmentation", "PascalVOC", "ShapesSegmentation", "fit_labels", "DATASETS",
           "evaluate", "format_table", "METHODS", "BACKGROUND_WORDS", "BinaryScores", "MultiClassScores", "EVAL_SIZE"]
