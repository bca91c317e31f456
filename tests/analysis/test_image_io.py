"""Images of figures 2 and 3 end to end: the image of a row, where a conv feature peaks, the figures' tiles.

A real image folder (12 images, 3 classes; each image's red channel is its id, green a ramp, blue a bright spot at
an image-dependent place) and embeddings written with :func:`featstudy.store.write_embedding` whose ``meta.json``
carries what extraction writes (dataset, random VGG19 weights and their seed, crops, preprocessing). Every
expectation comes from an independent torchvision forward: ``torch.manual_seed(seed)`` then
``torchvision.models.vgg19(weights=None)`` (featstudy's documented random weights), ``Resize`` +
``CenterCrop`` + ``Normalize``, ``create_feature_extractor`` on the ReLU after each conv, argmax of the channel's
map; receptive fields from the hand table; the most activating rows and D by numpy/scipy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import oracle  # the tests' scipy reference (tests/analysis/oracle.py), never featstudy
import pytest
import torch
from PIL import Image

from featstudy.analysis import AnalysisContext, image_io
from featstudy.analysis.figures import FiguresCallback
from featstudy.store import load_embedding, write_embedding

CLASSES = ["apple", "bus", "crabapple_tree_in_full_bloom"]  # the last is cut to 18 (row label) / 24 (class label)
LABELS = np.repeat(np.arange(3), 4)
SEED, RESIZE, SIZE, THUMB = 3, 36, 32, 96
# by hand, VGG19 (see test_images.py): layer -> (receptive field size, jump, centre of map position 0)
RF = {"conv1_1": (3, 1, 0.5), "conv1_2": (5, 1, 0.5), "conv2_1": (10, 2, 1.0), "conv3_1": (24, 4, 2.0)}
NETWORK = {"model": "vgg19", "weights": "random", "weights_source": "random", "weights_seed": SEED,
           "weights_sha256": None, "weights_path": None, "preprocessing": "torchvision", "pooling": "avg",
           "crops": {"name": "ten", "resize": RESIZE, "size": SIZE, "n_crops": 10}}


def picture(red: int, k: int, w: int, h: int) -> Image.Image:
    """Red = the image's id everywhere (kept exactly by any resize), green a ramp, blue an 8 px spot placed by k."""
    yy, xx = np.mgrid[:h, :w]
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = red
    a[..., 1] = (3 * xx + 2 * yy) % 256
    y0, x0 = (7 * k) % (h - 8), (11 * k) % (w - 8)
    a[y0:y0 + 8, x0:x0 + 8, 2] = 255
    return Image.fromarray(a)


def own_red(row: int) -> int:  # the analysed images: 10, 30, ..., 230
    return 10 + 20 * row


def inet_red(row: int) -> int:  # the ImageNet ones: 20, 40, ..., 120 (never an analysed image's)
    return 20 + 20 * row


def image_folder(root: Path) -> list[str]:
    """12 images of 48 x 40 px, ``root/<class>/<i>.png``; returns the rows' relative paths (ImageFolder order).
    48 x 40 -> 43 x 36 -> centre crop at x = round(5.5) = 6: a floor or a rounded side would shift it a pixel."""
    paths = []
    for row, c in enumerate(LABELS):
        rel = f"{CLASSES[c]}/{row % 4}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        picture(own_red(row), row, 48, 40).save(root / rel)
        paths.append(rel)
    return paths


def imagenet_folder(root: Path) -> list[str]:
    """A tiny ImageNet validation layout: 2 wnids x 3 images of 40 x 52 px."""
    paths = []
    for row in range(6):
        rel = f"val/n0{row // 3}/ILSVRC2012_val_{row:08d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        picture(inet_red(row), row + 5, 40, 52).save(root / rel)
        paths.append(rel)
    return paths


def write(folder: Path, features, labels, classes, paths, names, dataset: dict, **network) -> Path:
    meta = {"dataset": dataset, **NETWORK, **network}
    if dataset["name"] == "imagenet_val":
        meta["key_fields"] = {"dataset": {"name": "imagenet_val", "n_classes": 2, "class_seed": 0}}
    return write_embedding(folder, features=features, labels=labels, classes=classes, paths=paths,
                           feature_names=names, meta=meta)


# ------------------------------------------------------------------ the independent network

@pytest.fixture(scope="module")
def vgg():
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return torchvision.models.vgg19(weights=None).eval()


def square(img: Image.Image) -> Image.Image:
    """What the network is fed (crops=center): torchvision's Resize(36) then CenterCrop(32)."""
    import torchvision.transforms as T

    return T.CenterCrop(SIZE)(T.Resize(RESIZE, interpolation=T.InterpolationMode.BILINEAR)(img))


def conv_maps(net, nodes, pictures, layers, preprocessing: str = "torchvision") -> dict[str, np.ndarray]:
    """The conv maps of an independent torchvision forward; ``nodes``: conv name -> ReLU node
    (``helpers.vgg19_conv_relus``)."""
    import torchvision.transforms.functional as TF
    from torchvision.models.feature_extraction import create_feature_extractor

    x = torch.stack([TF.to_tensor(square(p)) for p in pictures])
    if preprocessing == "torchvision":
        x = TF.normalize(x, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    else:  # caffe: BGR in 0-255 minus the mean pixel (B, G, R)
        x = x.flip(1) * 255 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    body = create_feature_extractor(net, {nodes[layer]: layer for layer in layers})
    with torch.no_grad():
        return {k: v.numpy() for k, v in body(x).items()}


def peak(fmap: np.ndarray) -> tuple[int, int]:
    y, x = np.unravel_index(int(np.argmax(fmap)), fmap.shape)
    return int(y), int(x)


def lively_channel(maps: np.ndarray) -> int:
    """The first channel whose map peaks at one clearly largest positive place in every image, at 3+ places over
    the images, off the diagonal somewhere, and elsewhere than both neighbouring channels in some image."""
    n, c = maps.shape[:2]
    for ch in range(1, c - 1):
        flat = maps[:, ch].reshape(n, -1)
        top = flat.max(1)
        peaks = [peak(maps[i, ch]) for i in range(n)]
        second = np.sort(flat, 1)[:, -2]
        if (top <= 0).any() or (top - second < 1e-3 * top).any() or len(set(peaks)) < 3:
            continue
        if all(y == x for y, x in peaks):
            continue
        if all(any(peaks[i] != peak(maps[i, o]) for i in range(n)) for o in (ch - 1, ch + 1)):
            return ch
    raise AssertionError("no lively channel")


def thumb(img: Image.Image, box=None) -> np.ndarray:
    if box is not None:
        top, left, bottom, right = box
        img = img.crop((left, top, right, bottom))
    return np.asarray(img.resize((THUMB, THUMB), Image.Resampling.BILINEAR))


def hand_box(layer: str, y: int, x: int) -> tuple[int, int, int, int]:
    size, jump, start = RF[layer]
    cy, cx = start + y * jump, start + x * jump
    return (max(0, int(cy - size / 2)), max(0, int(cx - size / 2)),
            min(SIZE, int(cy + size / 2)), min(SIZE, int(cx + size / 2)))


def expected_cell(img: Image.Image, name: str, net_maps: dict, index: int) -> np.ndarray:
    """Conv feature: the receptive field of its peak on the centre square; fc: the whole centre square."""
    layer, channel = name.split(":")
    if layer == "fc7":
        return thumb(square(img))
    return thumb(square(img), hand_box(layer, *peak(net_maps[layer][index, int(channel)])))


# ------------------------------------------------------------------ image_io


def test_open_row_is_the_rows_image_and_none_when_the_dataset_changed(tmp_path):
    paths = image_folder(tmp_path / "images")
    ds = {"name": "imagefolder", "root": str(tmp_path / "images"), "split": "all"}
    names, feats = ["fc7:0"], np.zeros((12, 1))
    emb = load_embedding(write(tmp_path / "e", feats, LABELS, CLASSES, paths, names, ds))
    for row in (0, 5, 11):
        on_disk = np.asarray(Image.open(tmp_path / "images" / paths[row]))
        assert np.array_equal(np.asarray(image_io.open_row(emb, row)), on_disk)
    moved = paths[:3] + ["apple/9.png"] + paths[4:] + ["crabapple_tree_in_full_bloom/4.png"]
    emb2 = load_embedding(write(tmp_path / "e2", np.zeros((13, 1)), np.r_[LABELS, 2], CLASSES, moved, names, ds))
    on_disk = np.asarray(Image.open(tmp_path / "images" / paths[2]))
    assert np.array_equal(np.asarray(image_io.open_row(emb2, 2)), on_disk)  # rows before the change still open
    assert image_io.open_row(emb2, 3) is None and image_io.open_row(emb2, 12) is None
    gone = load_embedding(write(tmp_path / "e3", feats, LABELS, CLASSES, paths, names,
                                {**ds, "root": str(tmp_path / "nowhere")}))
    assert image_io.open_row(gone, 0) is None
    assert image_io.centre_crop_geometry(emb) == (36, 32)
    squashed = load_embedding(write(tmp_path / "e4", feats, LABELS, CLASSES, paths, names, ds,
                                    crops={"name": "none", "resize": None, "size": 32, "n_crops": 1}))
    assert image_io.centre_crop_geometry(squashed) == (32, 32)


@pytest.mark.parametrize("preprocessing", ["torchvision", "caffe"])
def test_peak_positions_equal_an_independent_forward(tmp_path, vgg, world, preprocessing, helpers):
    folder = world["own"]
    if preprocessing != "torchvision":  # the same embedding, made with Caffe-style preprocessing
        meta = load_embedding(folder).meta
        folder = write(tmp_path / "e", X, LABELS, CLASSES, world["paths"], world["names"], meta["dataset"],
                       preprocessing=preprocessing)
    pictures = world["pictures"][:5]
    layers = ["conv1_1", "conv2_1", "conv3_1", "conv4_2", "conv5_4"]
    maps = conv_maps(vgg, helpers.vgg19_conv_relus(vgg), pictures, layers, preprocessing)
    requests = [(i, layer, ch) for i in (0, 2, 3, 4) for layer in layers for ch in range(0, 64, 3)]
    got = image_io.peak_positions(load_embedding(folder), pictures,
                                  requests + [(1, "fc7", 0), (2, "conv9_1", 0)], batch_size=2)
    assert set(got) == set(requests)  # fc7 and unknown layers have no spatial map
    compared = 0
    for i, layer, ch in requests:
        flat = np.sort(maps[layer][i, ch].ravel())
        if flat[-1] - flat[-2] > 1e-4 * max(1.0, abs(flat[-1])):  # a clear maximum
            assert got[(i, layer, ch)] == peak(maps[layer][i, ch]), (i, layer, ch)
            compared += 1
    assert compared > len(requests) // 2
    assert len({got[r] for r in requests if r[1] == "conv1_1"}) > 5  # the peaks are not all in one place


def test_without_the_network_conv_features_show_whole_images(tmp_path):
    paths = image_folder(tmp_path / "images")
    ds = {"name": "imagefolder", "root": str(tmp_path / "images"), "split": "all"}
    feats = np.arange(24, dtype=float).reshape(12, 2)
    emb = load_embedding(write(tmp_path / "e", feats, LABELS, CLASSES, paths, ["conv1_1:0", "conv3_1:0"], ds,
                               weights="file:00", weights_source="file", weights_path=str(tmp_path / "none.pth")))
    from featstudy.analysis import images

    cells = images.ImageSource(AnalysisContext(emb, {"layers": None}, tmp_path / "out", "x")).top_images_many(
        ["conv3_1:0"], 2)["conv3_1:0"]
    for cell, row in zip(cells, (11, 10)):  # column 1 = 2 * row + 1: rows 11, 10 are the largest
        assert np.array_equal(cell, thumb(square(Image.open(tmp_path / "images" / paths[row]).convert("RGB"))))


# ------------------------------------------------------------------ figures 2 and 3

# Feature values (ranks) of the 12 images, classes apple (rows 0-3), bus (4-7), crabapple (8-11). D by hand:
#   F0 B {8,10,11,12} over A {5,6,7,9}, C {1..4}: D(B) = +7/8 (at x=7: F_out 7/8, F_in 0); D(C) = -1; D(A) = +1/2
#   F1 C {9..12} over A {1,3,5,7}, B {2,4,6,8}: D(C) = +1; D(A) = -5/8 (x=7: F_in 1, F_out 3/8); D(B) = -1/2
#   F2 mixed: +1/4 for every class          F3: D(B) = D(C) = +5/8 (tie: B), D(A) = -7/8 (x=5: 1 - 1/8)
#   F4: D(A) = D(C) = +1/2 (tie: A), D(B) = -3/4 (x=6: 1 - 2/8)    F5: (-1/2, +1/4, +1/2)    F6 constant: 0
COLUMNS = [[5, 6, 7, 9, 8, 10, 11, 12, 1, 2, 3, 4], [1, 3, 5, 7, 2, 4, 6, 8, 9, 10, 11, 12],
           [12, 2, 9, 4, 6, 10, 1, 7, 3, 11, 5, 8], [1, 2, 5, 3, 12, 9, 4, 11, 8, 6, 10, 7],
           [10, 12, 8, 3, 2, 1, 4, 6, 11, 5, 9, 7], [6, 1, 11, 2, 7, 3, 10, 4, 12, 9, 8, 5], [0] * 12]
X = np.array(COLUMNS, dtype=float).T
# ImageNet embedding: 6 images, other values, so other rows are the most activating
XI = np.array([[2, 5, 3, 4, 6, 1], [5, 1, 2, 4, 3, 6], [6, 4, 1, 2, 5, 3], [3, 2, 5, 4, 1, 6],
               [5, 4, 3, 1, 6, 2], [5, 2, 3, 1, 6, 4], [1, 3, 2, 6, 4, 5]], dtype=float).T
# (feature, class, D): top_k=4 distinct features by largest D (F0's second pair, +1/2 for A, and F3's tie for C are
# skipped as repeats), and by most negative D
FIG2 = [(1, 2, 1.0), (0, 1, 0.875), (3, 1, 0.625), (4, 0, 0.5)]
FIG3 = [(0, 2, -1.0), (3, 0, -0.875), (4, 1, -0.75), (1, 0, -0.625)]
# top_k=10: every feature with some D > 0 (resp. < 0), F6 (D = 0) in neither, F2 (no D < 0) not in figure 3
FIG2_ALL = [(1, 2), (0, 1), (3, 1), (4, 0), (5, 2), (2, 0)]
FIG3_ALL = [(0, 2), (3, 0), (4, 1), (1, 0), (5, 0)]


def top_rows(values: np.ndarray, n: int) -> list[int]:
    return sorted(range(len(values)), key=lambda r: -values[r])[:n]


def cell(strip: np.ndarray, j: int) -> np.ndarray:
    """Thumbnail j of a row's tile: 96 px squares, 4 px apart."""
    return strip[:, j * (THUMB + 4): j * (THUMB + 4) + THUMB]


def red_of(thumbnail: np.ndarray) -> int:
    values = np.unique(thumbnail[..., 0])
    assert len(values) == 1, values
    return int(values[0])


def figures(ctx, top_k: int) -> dict:
    cb = FiguresCallback(formats=["png"], top_k=top_k, n_images=3, n_class_images=2, dpi=30, which=["fig2", "fig3"])
    return cb.run(ctx).objects["figures"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, vgg, helpers):
    """The image folder, its embedding (features X) and an ImageNet one (XI) of the same network next to a copy of
    it, with two decoys sorted first; the conv channels are chosen lively on all 18 pictures."""
    root = tmp_path_factory.mktemp("world")
    paths, inet_paths = image_folder(root / "images"), imagenet_folder(root / "imagenet")
    pictures = [Image.open(root / "images" / p).convert("RGB") for p in paths]
    inet = [Image.open(root / "imagenet" / p).convert("RGB") for p in inet_paths]
    layers = ["conv2_1", "conv1_2", "conv3_1", "conv1_1"]  # of F0, F2, F3, F4
    maps = conv_maps(vgg, helpers.vgg19_conv_relus(vgg), pictures + inet, layers)
    ch = {layer: lively_channel(m) for layer, m in maps.items()}
    names = [f"conv2_1:{ch['conv2_1']}", "fc7:11", f"conv1_2:{ch['conv1_2']}", f"conv3_1:{ch['conv3_1']}",
             f"conv1_1:{ch['conv1_1']}", "fc7:4000", "conv5_4:7"]
    ds = {"name": "imagefolder", "root": str(root / "images"), "split": "all"}
    own = write(root / "alone" / "own", X, LABELS, CLASSES, paths, names, ds)
    inet_ds = {"name": "imagenet_val", "root": str(root / "imagenet"), "split": "val", "n_classes": 2,
               "class_seed": 0}  # as ImageNetVal.describe() writes it into meta.json
    beside = write(root / "beside" / "own", X, LABELS, CLASSES, paths, names, ds)
    write(root / "beside" / "inet", XI, np.repeat([0, 1], 3), ["n00", "n01"], inet_paths, names, inet_ds)
    write(root / "beside" / "a_seed4", XI[::-1], np.repeat([0, 1], 3), ["n00", "n01"], inet_paths, names, inet_ds,
          weights_seed=4)
    write(root / "beside" / "a_maxpool", XI[::-1], np.repeat([0, 1], 3), ["n00", "n01"], inet_paths, names,
          inet_ds, pooling="max")
    ctx = AnalysisContext(load_embedding(own), {"bins": None, "layers": None}, root / "out", "tinyfolder")
    ctx_beside = AnalysisContext(load_embedding(beside), {"bins": None, "layers": None}, root / "out2", "tinyfolder")
    d = oracle.signed_d(X, LABELS, 3)[0]
    return {"names": names, "pictures": pictures, "inet": inet, "d": d, "paths": paths, "own": own,
            "maps": {k: v[:12] for k, v in maps.items()}, "inet_maps": {k: v[12:] for k, v in maps.items()},
            "figs": figures(ctx, 4), "all": figures(ctx, 10), "beside": figures(ctx_beside, 4)}


def check_label(ax, world, f, c, d):
    assert world["d"][f, c] == d  # the hand D of the table above, by scipy
    assert ax.get_ylabel() == f"{world['names'][f]}\n{CLASSES[c][:18]}\nD={d:+.2f}"


def check_activating(strip, world, f, values, pictures, maps, red):
    """The 3 images of feature f with the largest values, in order, each cropped as its layer dictates."""
    rows = top_rows(values[:, f], 3)
    assert [red_of(cell(strip, j)) for j in range(3)] == [red(r) for r in rows]
    for j, r in enumerate(rows):
        assert np.array_equal(cell(strip, j), expected_cell(pictures[r], world["names"][f], maps, r)), (f, r)


def check_top_rows(world, name: str, sign: str, expected, cells: int):
    """Figure ``name``: its title, one row per expected (feature, class, D) with its label and its 3 activating
    images; yields (axes, class, strip) for further checks."""
    fig = world["figs"][name]
    assert fig._suptitle.get_text() == f"tinyfolder: top 4 features by {sign} (activating images from tinyfolder)"
    assert len(fig.axes) == len(expected)
    for ax, (f, c, d) in zip(fig.axes, expected):
        check_label(ax, world, f, c, d)
        strip = np.asarray(ax.images[0].get_array())
        assert strip.shape == (THUMB, cells * (THUMB + 4), 3)
        check_activating(strip, world, f, X, world["pictures"], world["maps"], own_red)
        yield ax, c, strip


def test_fig2_shows_the_top_features_by_d_plus_and_their_top_images(world):
    for ax, _, _ in check_top_rows(world, "fig2", "D+", FIG2, 3):
        assert not ax.texts  # no class samples in figure 2


def test_fig3_shows_the_top_features_by_d_minus_then_samples_of_the_class(world):
    for ax, c, strip in check_top_rows(world, "fig3", "D-", FIG3, 6):  # 3 activating, a gap, 2 class samples
        assert (cell(strip, 3) == 255).all()
        first = [4 * c, 4 * c + 1]  # the class's first two rows, whole images (squeezed to a square)
        assert [red_of(cell(strip, 4 + m)) for m in range(2)] == [own_red(r) for r in first]
        for m, r in enumerate(first):
            assert np.array_equal(cell(strip, 4 + m), thumb(world["pictures"][r]))
        assert [t.get_text() for t in ax.texts] == [f"class {CLASSES[c][:24]}"]


def test_fc_features_show_the_whole_centre_square(world):
    strip = np.asarray(world["figs"]["fig2"].axes[0].images[0].get_array())
    for j, r in enumerate(top_rows(X[:, 1], 3)):  # fig2's first row is fc7:11
        assert np.array_equal(cell(strip, j), thumb(square(world["pictures"][r])))


def test_top_k_stops_where_d_changes_sign(world):
    def shown(fig):
        return [ax.get_ylabel().split("\n")[:2] for ax in fig.axes]

    assert shown(world["all"]["fig2"]) == [[world["names"][f], CLASSES[c][:18]] for f, c in FIG2_ALL]
    assert shown(world["all"]["fig3"]) == [[world["names"][f], CLASSES[c][:18]] for f, c in FIG3_ALL]


def test_an_imagenet_embedding_of_the_same_network_supplies_the_activating_images(world):
    for name, spec in (("fig2", FIG2), ("fig3", FIG3)):
        fig = world["beside"][name]
        assert fig._suptitle.get_text().endswith("(activating images from the ImageNet validation embedding)")
        for ax, (f, c, d) in zip(fig.axes, spec):
            check_label(ax, world, f, c, d)  # D is the analysed dataset's
            strip = np.asarray(ax.images[0].get_array())
            check_activating(strip, world, f, XI, world["inet"], world["inet_maps"], inet_red)
            if name == "fig3":  # class samples stay the analysed dataset's
                assert [red_of(cell(strip, 4 + m)) for m in range(2)] == [own_red(4 * c + m) for m in range(2)]


def test_rows_after_a_skipped_image_still_show_their_own_images(tmp_path):
    """Images 1 and 6 were unreadable (skipped): rows and dataset samples fall out of step after them, so row r is
    the image ``paths.txt`` names, found by its path. Every cell of figures 2 and 3 must show the image of the row
    it stands for (red = that image's id); a row number taken as a sample index shows a grey cell or a neighbour."""
    paths = image_folder(tmp_path / "images")
    kept = [i for i in range(12) if i not in (1, 6)]
    ds = {"name": "imagefolder", "root": str(tmp_path / "images"), "split": "all"}
    names = [f"fc7:{k}" for k in range(X.shape[1])]
    emb = load_embedding(write(tmp_path / "e", X[kept], LABELS[kept], CLASSES, [paths[i] for i in kept], names, ds))
    for row, image in enumerate(kept):
        assert red_of(np.asarray(image_io.open_row(emb, row))) == own_red(image)
    figs = figures(AnalysisContext(emb, {"bins": None, "layers": None}, tmp_path / "out", "tinyfolder"), 10)
    for name in ("fig2", "fig3"):
        assert figs[name].axes, name
        for ax in figs[name].axes:
            feature, klass = ax.get_ylabel().split("\n")[:2]
            column = X[kept, int(feature.split(":")[1])]
            strip = np.asarray(ax.images[0].get_array())
            top = sorted(range(len(kept)), key=lambda r: -column[r])[:3]
            assert [red_of(cell(strip, j)) for j in range(3)] == [own_red(kept[r]) for r in top], (name, feature)
            if name == "fig3":
                c = [n[:18] for n in CLASSES].index(klass)
                first = [i for i in kept if LABELS[i] == c][:2]
                assert [red_of(cell(strip, 4 + m)) for m in range(2)] == [own_red(i) for i in first]
