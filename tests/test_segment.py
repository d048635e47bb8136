"""Zero-shot segmentation: metrics against hand computations, loaders on fixtures in the real file formats."""

import json

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from revelio.cli import run
from revelio.config import ConfigError
from revelio.segmentation import BinaryScores, ImageNetSegmentation, MultiClassScores, PascalVOC, ShapesSegmentation
from revelio.segmentation.evaluate import center_prior


def _naive_ap(scores, positive):
    """AP with distinct scores: mean over positives of the precision at each positive's rank."""
    order = np.argsort(-scores)
    hits, precisions = 0, []
    for rank, i in enumerate(order, start=1):
        if positive[i]:
            hits += 1
            precisions.append(hits / rank)
    return np.mean(precisions)


def test_binary_scores_match_hand_computation():
    a = np.array([[0.9, 0.1], [0.8, 0.2]])  # mean 0.5 -> fg = left column
    ma = np.array([[True, False], [False, False]])
    b = np.array([[0.3, 0.7, 0.6], [0.1, 0.2, 0.4]])  # mean 0.38333 -> fg = {0.7, 0.6, 0.4}
    mb = np.array([[False, True, True], [True, False, False]])
    s = BinaryScores()
    s.update(a, ma)
    s.update(b, mb)
    # a: pred fg {(0,0),(1,0)}, truth fg {(0,0)}: 3/4 correct. b: pred {(0,1),(0,2),(1,2)}, truth {(0,1),(0,2),(1,0)}: 4/6.
    r = s.result()
    assert r["pixel_acc"] == pytest.approx(100 * 7 / 10)
    # foreground I/U: a 1/2, b 2/4 -> 3/6; background I/U: a 2/3, b 2/4 -> 4/7 (accumulated, not averaged per image)
    assert r["miou"] == pytest.approx(100 * (3 / 6 + 4 / 7) / 2)
    assert r["map"] == pytest.approx(100 * (_naive_ap(a.ravel(), ma.ravel()) + _naive_ap(b.ravel(), mb.ravel())) / 2)
    assert _naive_ap(a.ravel(), ma.ravel()) == 1.0 and _naive_ap(b.ravel(), mb.ravel()) == pytest.approx((1 + 1 + 3 / 6) / 3)  # 0.1 is the 6th score


def test_binary_scores_ignore_pixels_and_multiclass_by_name():
    s = BinaryScores()
    soft = np.array([[1.0, 0.0, 5.0]])
    s.update(soft, np.array([[True, False, False]]), valid=np.array([[True, True, False]]))
    assert s.result()["pixel_acc"] == 100.0  # the ignored pixel neither counts nor moves the mean
    m = MultiClassScores()
    m.update(np.array([[0, 1, 1, 2]]), np.array([[0, 1, 2, 255]]), ["background", "cat", "dog"])
    m.update(np.array([[1, 1]]), np.array([[1, 0]]), ["background", "dog"])
    r = m.result()
    assert r["pixel_acc"] == pytest.approx(100 * 3 / 5)
    # background: I 1, U 2; cat: I 1, U 2; dog: (img1) I 0 U 1 + (img2) I 1 U 2 -> 1/3
    assert r["miou"] == pytest.approx(100 * (1 / 2 + 1 / 2 + 1 / 3) / 3)


def _gtsegs_v73(path, images, masks, ids):
    """A MATLAB v7.3 (HDF5) file in the gtsegs_ijcv layout: cells are object references, arrays transposed."""
    with h5py.File(path, "w") as f:
        refs = f.create_group("#refs#")
        ref = h5py.special_dtype(ref=h5py.Reference)
        img_refs, gt_refs, id_refs = [], [], []
        for i, (im, m, sid) in enumerate(zip(images, masks, ids)):
            img_refs.append(refs.create_dataset(f"img{i}", data=im.transpose(2, 1, 0)).ref)
            mask_ds = refs.create_dataset(f"mask{i}", data=m.astype(np.uint8).transpose(1, 0))
            cell = refs.create_dataset(f"gtcell{i}", shape=(1, 1), dtype=ref)
            cell[0, 0] = mask_ds.ref
            gt_refs.append(cell.ref)
            id_refs.append(refs.create_dataset(f"id{i}", data=np.array([[ord(c)] for c in sid], dtype=np.uint16)).ref)
        v = f.create_group("value")
        for name, rs in (("img", img_refs), ("gt", gt_refs), ("id", id_refs)):
            d = v.create_dataset(name, shape=(len(rs), 1), dtype=ref)
            for i, r in enumerate(rs):
                d[i, 0] = r


def _fixture_images(rng, n=2):
    images = [rng.integers(0, 255, size=(6 + i, 9, 3), dtype=np.uint8) for i in range(n)]
    masks = [np.zeros(im.shape[:2], dtype=bool) for im in images]
    for i, m in enumerate(masks):
        m[1:4, 2 + i:7] = True
    return images, masks


@pytest.mark.parametrize("version", ["v7.3", "v5"])
def test_imagenet_segmentation_reads_gtsegs_ijcv_layout(tmp_path, version):
    rng = np.random.default_rng(0)
    images, masks = _fixture_images(rng)
    ids = ["n02085620_10074", "n01440764_222"]
    path = tmp_path / "gtsegs_ijcv.mat"
    if version == "v7.3":
        _gtsegs_v73(path, images, masks, ids)
    else:
        cells = {k: np.empty((2, 1), dtype=object) for k in ("img", "gt", "id")}
        for i in range(2):
            cells["img"][i, 0] = images[i]
            inner = np.empty((1, 1), dtype=object)
            inner[0, 0] = masks[i].astype(np.uint8)
            cells["gt"][i, 0] = inner
            cells["id"][i, 0] = ids[i]
        scipy.io.savemat(path, {"value": cells})
    names = tmp_path / "LOC_synset_mapping.txt"
    names.write_text("n02085620 Chihuahua\nn01440764 tench, Tinca tinca\n")
    samples = list(ImageNetSegmentation(path, synset_names=names))
    assert [s.classes for s in samples] == [["chihuahua"], ["tench"]]
    for s, im, m in zip(samples, images, masks):
        assert np.array_equal(np.asarray(s.image), im)  # orientation survives the MATLAB transposes
        assert np.array_equal(s.labels, m.astype(np.int64))
    assert list(ImageNetSegmentation(path, count=1))[0].classes == ["object"]  # no name file: generic word
    with pytest.raises(FileNotFoundError, match="gtsegs_ijcv.mat"):
        ImageNetSegmentation(tmp_path / "missing.mat")


def _palette_png(path, labels):
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    img.save(path)


def test_pascal_voc_reads_palette_pngs_and_single_class_subset(tmp_path):
    (tmp_path / "SegmentationClass").mkdir()
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    one = np.zeros((8, 10), dtype=np.uint8)
    one[2:5, 3:7] = 12  # dog
    one[1, :] = 255  # boundary
    two = np.zeros((8, 10), dtype=np.uint8)
    two[:3] = 1  # aeroplane
    two[5:] = 15  # person
    for sid, lab in (("2007_000001", one), ("2007_000002", two)):
        _palette_png(tmp_path / "SegmentationClass" / f"{sid}.png", lab)
        Image.fromarray(np.full((8, 10, 3), 128, dtype=np.uint8)).save(tmp_path / "JPEGImages" / f"{sid}.jpg")
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000001\n2007_000002\n")
    both = list(PascalVOC(tmp_path))
    assert [s.classes for s in both] == [["dog"], ["airplane", "person"]]
    assert (both[0].labels[1] == 255).all() and both[0].labels[3, 4] == 1 and both[0].labels[6, 0] == 0
    assert both[1].labels[0, 0] == 1 and both[1].labels[7, 0] == 2
    assert [s.id for s in PascalVOC(tmp_path, single_class=True)] == ["2007_000001"]
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "SegmentationClass" / "2007_000001.png")
    with pytest.raises(Exception, match="not a palette PNG"):
        list(PascalVOC(tmp_path))


def test_shapes_segmentation_labels_follow_the_masks():
    for s in ShapesSegmentation(count=3, size=32):
        assert s.classes and s.labels.shape == (32, 32)
        for k, c in enumerate(s.classes, start=1):
            assert (s.labels == k).sum() > 0
    assert center_prior(3, size=8)[0].argmax() in (27, 28, 35, 36)  # the peak sits in the middle
    from revelio.datasets import COLORS
    for shape_s, colour_s in zip(ShapesSegmentation(count=3, size=32), ShapesSegmentation(count=3, size=32,
                                                                                          label="colour")):
        assert set(colour_s.classes) <= set(COLORS)
        assert np.array_equal(shape_s.labels > 0, colour_s.labels > 0)  # same objects, other words


def test_segment_command_writes_one_table(tmp_path):
    out = tmp_path / "seg"
    res = run(["segment", "--count", "2", "--size", "32", "--seeds", "[0]", "--out", str(out),
               "--methods", "[cross_attention, concept_attention, daam, center_prior]"])
    assert list(res) == ["cross_attention", "concept_attention", "daam", "center_prior"]
    for r in res.values():
        assert 0 <= r["pixel_acc"] <= 100 and 0 <= r["miou"] <= 100 and r["images"] == 2
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(res))
    table = (out / "table.md").read_text()
    assert table.count("\n| ") == 5  # header + 4 methods
    multi = run(["segment", "--count", "2", "--size", "32", "--seeds", "[0]", "--out", str(out),
                 "--protocol", "multi", "--methods", "[center_prior]"])
    assert multi["center_prior"]["images"] == 2
    colour = run(["segment", "--count", "2", "--size", "32", "--seeds", "[0]", "--out", str(out), "--label", "colour",
                  "--methods", "[center_prior]"])
    assert colour["center_prior"]["images"] == 2 and "colour words" in (out / "table.md").read_text()
    with pytest.raises(ConfigError, match="valid: concept_attention, cross_attention, daam, center_prior"):
        run(["segment", "--methods", "[gradcam]"])
    with pytest.raises(ConfigError, match="needs --path"):
        run(["segment", "--dataset", "voc"])


def test_real_image_maps_average_over_noise_seeds(tiny_flux):
    from revelio.saliency.real_image import concept_attention_on_images

    s = next(iter(ShapesSegmentation(count=1, size=32)))
    kw = dict(concepts=["circle", "background"], captions=["a " + s.classes[0]],
              t=500, size=32)
    both = concept_attention_on_images(tiny_flux, [s.image], seeds=[0, 1], **kw)
    one = [concept_attention_on_images(tiny_flux, [s.image], seeds=[k], **kw) for k in (0, 1)]
    assert both.calls == 2
    torch.testing.assert_close(both.maps(), (one[0].maps() + one[1].maps()) / 2)
    assert not torch.allclose(one[0].maps(), one[1].maps())  # the seeds do change the noise


def test_shipped_configs_load():
    from pathlib import Path

    from revelio import config as C
    from revelio.commands.saliency_segment import SaliencyConfig, SegmentConfig

    root = Path(__file__).parent.parent / "configs"
    files = {cls: sorted((root / sub).glob("*.yaml")) for cls, sub in ((SaliencyConfig, "saliency"),
                                                                       (SegmentConfig, "segment"))}
    assert all(files.values())
    for cls, paths in files.items():
        for p in paths:
            C.load(cls, p)


def test_table_shows_every_method_beside_the_centre_prior(tmp_path):
    from revelio.segmentation import format_table

    res = {"daam": {"pixel_acc": 60.0, "miou": 40.0, "map": 50.0, "images": 4},
           "cross_attention": {"pixel_acc": 70.0, "miou": 45.5, "map": 30.0, "images": 4},
           "center_prior": {"pixel_acc": 65.0, "miou": 42.0, "map": 35.0, "images": 4}}
    table = format_table(res, "t")
    assert "| daam | 60.0 | 40.0 | 50.0 | 4 | -2.0 | +15.0 |" in table
    assert "| cross_attention | 70.0 | 45.5 | 30.0 | 4 | +3.5 | -5.0 |" in table
    assert "| center_prior | 65.0 | 42.0 | 35.0 | 4 | +0.0 | +0.0 |" in table
    assert table.splitlines()[-1] == ("Beat the centre prior in mIoU (42.0): cross_attention (+3.5); "
                                      "in mAP (35.0): daam (+15.0).")
    # the command always adds the prior, whatever methods it is given
    r = run(["segment", "--count", "1", "--size", "32", "--seeds", "[0]", "--methods", "[daam]",
             "--out", str(tmp_path / "s")])
    assert list(r) == ["daam", "center_prior"] and "mIoU - prior" in (tmp_path / "s" / "table.md").read_text()
