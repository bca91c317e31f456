"""Oxford 102 Flowers, through torchvision's ``Flowers102``; the paper uses ``split=test`` (6,149 images).

Layout (torchvision's): ``dataset.root/flowers-102/{jpg/image_XXXXX.jpg, imagelabels.mat, setid.mat}``; the .mat
files are md5-checked by torchvision. Splits ``train`` (1,020), ``val`` (1,020), ``test`` (6,149); labels 0-based;
class names are torchvision's.
"""

from __future__ import annotations

from featstudy.datasets.base import ImageDataset, missing_root
from featstudy.errors import DataError


class Flowers102(ImageDataset):
    name = "flowers102"
    splits = ("train", "val", "test")

    def __init__(self, root, split: str = "test", download: bool = False, transform=None):
        super().__init__(root, split, download, transform)
        from torchvision.datasets import Flowers102 as TVFlowers102

        try:
            tv = TVFlowers102(str(self.root), split=self.split, download=self.download)
        except RuntimeError as exc:
            raise missing_root(self.name, self.root, "flowers-102/ with jpg/, imagelabels.mat and setid.mat (md5-checked)") from exc
        except OSError as exc:  # urllib's URLError and friends, from download=true
            raise DataError(f"dataset.download: fetching flowers102 failed ({exc}); download 102flowers.tgz, imagelabels.mat "
                            f"and setid.mat from {TVFlowers102._download_url_prefix} and place them in {self.root / 'flowers-102'}") from exc
        self.classes = list(TVFlowers102.classes)
        self.samples = [(p.relative_to(self.root).as_posix(), int(y)) for p, y in zip(tv._image_files, tv._labels)]
