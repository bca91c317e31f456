"""Oxford 102 Flowers, read from its official files; the paper uses ``split=test`` (6,149 images).

Official layout (the one torchvision's ``Flowers102`` also uses; ``dataset.root`` is the folder that holds
``flowers-102/``, or ``flowers-102/`` itself)::

    flowers-102/jpg/image_00001.jpg ... image_08189.jpg     (from 102flowers.tgz)
    flowers-102/imagelabels.mat    labels: 1 x 8189, class of image k (1-based, 1..102)
    flowers-102/setid.mat          trnid, valid, tstid: 1-based image numbers of each split

Both ``.mat`` files are md5-checked against the official ones before they are read. Splits ``train`` (``trnid``,
1,020 images), ``val`` (``valid``, 1,020), ``test`` (``tstid``, 6,149), in the file's order; labels 0-based; class
names are the published ones (as torchvision lists them). ``dataset.download=true`` fetches the three files from
the official site, md5-checked. Source: https://www.robots.ox.ac.uk/~vgg/data/flowers/102/
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featstudy.datasets.base import ImageDataset, check_file_hash, fetch_archive, missing_root, safe_extract
from featstudy.errors import DataError


class Flowers102(ImageDataset):
    name = "flowers102"
    splits = ("train", "val", "test")
    url = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
    #: the official files and their md5 digests
    files = {"images": ("102flowers.tgz", "52808999861908f626f3c1f4e79d11fa"),
             "labels": ("imagelabels.mat", "e0620be6f572b9609742df49c70aed4d"),
             "setid": ("setid.mat", "a5357ecc9cb78c4bef273ce3793fc85c")}
    split_keys = {"train": "trnid", "val": "valid", "test": "tstid"}
    n_classes = 102

    def __init__(self, root, split: str = "test", download: bool = False, transform=None, *, name: str | None = None,
                 max_pixels: int | None = None, per_class: int | None = None):
        super().__init__(root, split, download, transform, name=name, max_pixels=max_pixels, per_class=per_class)
        base = self._base()
        if base is None and self.download:
            base = self.root / "flowers-102"
            base.mkdir(parents=True, exist_ok=True)
            for key in ("labels", "setid", "images"):
                name, md5 = self.files[key]
                path = fetch_archive(self.url + name, base, name, md5)
                if key == "images" and not (base / "jpg").is_dir():
                    safe_extract(path, base)
            base = self._base()
        if base is None:
            raise missing_root(self.name, self.root, "flowers-102/ with jpg/, imagelabels.mat and setid.mat (md5-checked)")
        for key in ("labels", "setid"):
            name, md5 = self.files[key]
            check_file_hash(base / name, md5=md5, key="dataset.root")
        labels = self._read_mat(base / self.files["labels"][0], "labels")
        ids = self._read_mat(base / self.files["setid"][0], self.split_keys[self.split])
        if labels.size == 0 or labels.min() < 1 or labels.max() > self.n_classes:
            raise DataError(f"dataset.root: {base / 'imagelabels.mat'}: labels must lie in 1..{self.n_classes}")
        if ids.size and (ids.min() < 1 or ids.max() > labels.size):
            raise DataError(f"dataset.root: {base / 'setid.mat'}: {self.split_keys[self.split]} holds image numbers "
                            f"outside 1..{labels.size} (imagelabels.mat has {labels.size} labels)")
        prefix = base.relative_to(self.root).as_posix() if base != self.root else ""
        self.classes = list(CLASSES)
        self.samples = [(f"{prefix + '/' if prefix else ''}jpg/image_{int(k):05d}.jpg", int(labels[int(k) - 1]) - 1)
                        for k in ids]

    def _base(self) -> Path | None:
        for cand in (self.root / "flowers-102", self.root):
            if (cand / "jpg").is_dir() and all((cand / self.files[k][0]).is_file() for k in ("labels", "setid")):
                return cand
        return None

    @staticmethod
    def _read_mat(path: Path, key: str) -> np.ndarray:
        """The integer vector ``key`` of a MATLAB file, flattened."""
        from scipy.io import loadmat

        try:
            mat = loadmat(str(path))
        except Exception as exc:  # noqa: BLE001 - scipy raises several kinds for a broken file
            raise DataError(f"dataset.root: {path}: not a readable MATLAB file ({exc})") from exc
        if key not in mat:
            raise DataError(f"dataset.root: {path}: no variable {key!r} (found {sorted(k for k in mat if not k.startswith('__'))})")
        values = np.asarray(mat[key]).ravel()
        if values.dtype.kind not in "iuf" or not np.all(values == np.round(values)):
            raise DataError(f"dataset.root: {path}: {key} must hold integers")
        return values.astype(np.int64)


#: The 102 class names in label order, as published with the dataset (torchvision lists the same).
CLASSES = [
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot",
    "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily",
    "balloon flower", "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william",
    "carnation", "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya",
    "cape flower", "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily",
    "poinsettia", "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium",
    "orange dahlia", "pink-yellow dahlia?", "cautleya spicata", "japanese anemone", "black-eyed susan",
    "silverbush", "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower",
    "tree poppy", "gazania", "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower",
    "lotus", "toad lily", "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose",
    "tree mallow", "magnolia", "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss",
    "foxglove", "bougainvillea", "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower",
    "trumpet creeper", "blackberry lily",
]
