"""The independent judge of zoo generations, validated on ground-truth shapes images."""

from __future__ import annotations

import numpy as np

from revelio.datasets.shapes import SHAPES
from revelio.zoo.quality import ShapesJudge, confusion, format_confusion, real_images, shape_recall


def test_judge_names_ground_truth_single_objects():
    judge = ShapesJudge.fit(n_train=300, n_val=60, seed=0)
    images, colours, shapes = real_images(240, seed=3)  # a seed stream the judge never trained on
    acc = judge.accuracy(images, [f"{c} {s}" for c, s in zip(colours, shapes)])
    assert acc["colour"] >= 0.97 and acc["shape"] >= 0.97, acc
    conf = acc["confusion"]
    assert set(conf) == set(SHAPES)  # every shape occurs among 240 images
    assert sum(sum(row.values()) for row in conf.values()) == 240
    assert all(r >= 0.85 for r in acc["shape_recall"].values()), acc["shape_recall"]


def test_confusion_and_recall_count_by_hand():
    conf = confusion(["star", "star", "star", "circle"], ["star", "cross", None, "circle"])
    assert conf["star"]["star"] == 1 and conf["star"]["cross"] == 1 and conf["star"]["none"] == 1
    assert "square" not in conf  # only asked shapes get a row
    rec = shape_recall(conf)
    assert np.isclose(rec["star"], 1 / 3) and rec["circle"] == 1.0
    text = format_confusion(conf)
    assert "33%" in text and "100%" in text
