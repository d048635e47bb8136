import numpy as np
import pytest
from PIL import Image

from revelio.datasets import COLORS, SHAPES, DataConfig, Digits, HFDiskDataset, ImageFolder, Shapes, load_dataset


def test_shapes_is_deterministic_and_independent_of_count():
    a, b = Shapes(size=48, count=10, seed=3), Shapes(size=48, count=50, seed=3)
    for i in range(10):
        sa, sb = a[i], b[i]
        assert sa.id == sb.id and sa.caption == sb.caption and sa.label == sb.label
        assert np.array_equal(np.asarray(sa.image), np.asarray(sb.image))
    assert not np.array_equal(np.asarray(Shapes(48, 2, seed=4)[0].image), np.asarray(a[0].image))
    assert Shapes(48, 5, seed=3, split="test")[0].id != a[0].id


def test_upright_shapes_keep_the_layouts_and_turn_nothing():
    """rotate=False: the same captions, positions, sizes and colours as the rotated world, every angle 0, and an
    upright square's mask fills its axis-aligned bounding box."""
    rot, up = Shapes(64, 30, seed=5), Shapes(64, 30, seed=5, rotate=False)
    turned = 0
    for i in range(30):
        a, b = rot.layout(i), up.layout(i)
        assert [{k: v for k, v in o.items() if k != "angle"} for o in a] == \
            [{k: v for k, v in o.items() if k != "angle"} for o in b]
        assert all(o["angle"] == 0.0 for o in b)
        turned += any(o["angle"] != 0.0 for o in a)
        assert rot[i].caption == up[i].caption
        for o in b:
            if o["shape"] == "square":
                m = up[i].masks[f"{o['color']} square"]
                ys, xs = np.nonzero(m)
                box = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
                assert box.mean() > 0.97, i  # an upright square fills its bounding box
    assert turned > 20


def test_shapes_masks_match_captions():
    ds = Shapes(size=64, count=40, seed=0)
    counts = set()
    for s in ds.iter_samples():
        img = np.asarray(s.image)
        words = s.caption.replace(",", "").split()
        objs = [(words[i + 1], words[i + 2]) for i, w in enumerate(words) if w in ("a", "an")]
        counts.add(len(objs))
        assert 1 <= len(objs) <= 3
        assert SHAPES[s.label] == objs[0][1]  # label = shape of the largest (first-named) object
        union = np.zeros(img.shape[:2], bool)
        for colour, shape in objs:
            m = s.masks[f"{colour} {shape}"]
            assert m.sum() > 20, (s.id, colour, shape)
            # every masked pixel has exactly the named colour
            assert np.all(img[m] == np.array(COLORS[colour], dtype=np.uint8))
            assert m.sum() <= s.masks[shape].sum() and m.sum() <= s.masks[colour].sum()
            union |= m
        assert np.array_equal(s.masks["background"], ~union)
    assert counts == {1, 2, 3}


def test_digits_real_and_split():
    tr, te = Digits(size=32, seed=0), Digits(size=32, seed=0, split="test")
    assert len(tr) + len(te) == 1797 and not set(tr.ids()) & set(te.ids())
    s = tr[0]
    assert s.image.size == (32, 32) and s.image.mode == "RGB" and 0 <= s.label <= 9
    assert s.caption.startswith("a handwritten digit")
    assert s.masks["digit"].any() and s.masks["background"].any()
    with pytest.raises(ValueError, match="holds"):
        Digits(count=5000)


def _make_folder(root):
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "cat" / "rgb.png")
    Image.new("L", (30, 30), 90).save(root / "cat" / "gray.jpg")
    Image.new("RGBA", (30, 30), (0, 0, 255, 128)).save(root / "dog" / "rgba.png")
    Image.new("P", (30, 30), 3).save(root / "dog" / "palette.gif")
    (root / "dog" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    (root / "dog" / "notes.txt").write_text("not an image")


def test_image_folder_converts_and_skips_bad_files(tmp_path, caplog):
    _make_folder(tmp_path)
    ds = ImageFolder(tmp_path, size=16)
    assert ds.class_names == ["cat", "dog"] and len(ds.non_images) == 1
    samples = list(ds.iter_samples())
    assert len(samples) == 4 and ds.skipped == ["dog/corrupt.png"]
    assert all(s.image.mode == "RGB" and s.image.size == (16, 16) for s in samples)
    assert {s.caption for s in samples} == {"a photo of a cat", "a photo of a dog"}
    assert "unreadable" in caplog.text


def test_hf_disk_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["red", "blue"])})
    imgs = [Image.new("RGB", (20, 20), (255, 0, 0)), Image.new("L", (20, 20), 30)]
    datasets.Dataset.from_dict({"image": imgs, "label": [0, 1]}, features=feats).save_to_disk(str(tmp_path / "ds"))
    ds = HFDiskDataset(tmp_path / "ds", size=8)
    s = list(ds.iter_samples())
    assert [x.label for x in s] == [0, 1] and s[1].caption == "a photo of a blue" and s[1].image.mode == "RGB"
    loaded = load_dataset(DataConfig(name="hf", path=str(tmp_path / "ds"), size=8, count=None))
    assert len(loaded) == 2


def test_unknown_dataset_lists_valid():
    with pytest.raises(ValueError, match="valid: shapes, digits, folder, hf"):
        load_dataset(DataConfig(name="imagenet"))
    with pytest.raises(ValueError, match="needs data.path"):
        load_dataset(DataConfig(name="folder"))


def test_shapes_colour_label_names_the_largest_objects_colour():
    from revelio.datasets import COLORS, DataConfig, Shapes, load_dataset

    by_shape, by_colour = Shapes(size=32, count=12, seed=3), Shapes(size=32, count=12, seed=3, label="colour")
    assert by_colour.class_names == list(COLORS) and by_shape.class_names != by_colour.class_names
    for i in range(12):
        a, b = by_shape[i], by_colour[i]
        assert a.caption == b.caption and np.array_equal(np.asarray(a.image), np.asarray(b.image))
        first = b.caption.split(",")[0].split(" and ")[0].split()  # "a red circle" -> the largest object
        assert by_colour.class_names[b.label] == first[1] and by_shape.class_names[a.label] == first[2]
        assert set(b.concepts) <= set(COLORS) | {"background"} and all(c in b.masks for c in b.concepts)
    assert load_dataset(DataConfig(name="shapes", count=4, label="colour")).class_names == list(COLORS)
    with pytest.raises(ValueError, match="shape, colour"):
        Shapes(label="size")


def test_preview_mask_colours_are_the_objects_colours():
    """The data preview paints each object's mask in the object's own colour (3-object images included)."""
    from revelio.datasets import Shapes
    from revelio.viz import mask_paint

    ds = Shapes(size=64, count=40, seed=0)
    three = [s for s in (ds[i] for i in range(40)) if len([n for n in s.masks if " " in n]) == 3]
    assert three
    for s in three[:3]:
        paint, img = mask_paint(s.masks), np.asarray(s.image)
        objects = np.zeros(img.shape[:2], dtype=bool)
        for name, m in s.masks.items():
            if " " in name:
                objects |= m
        np.testing.assert_array_equal(paint[objects], img[objects])  # the image shows each object in its colour
        assert (paint[~objects] == 128).all()
