"""The on-disk embedding store: one folder per embedding key, readable outside Python.

Layout of ``<paths.cache_dir>/embeddings/<key>/``::

    features.npy        N x F float32, row i = image i (open with np.load(mmap_mode="r"))
    labels.npy          N int64, index into classes.txt
    paths.txt           row i -> image path relative to the dataset root
    classes.txt         one class name a line, index = label
    feature_names.txt   one ``layer:channel`` a line (e.g. ``conv4_1:221``), column order of features.npy
    skipped.txt         images that could not be read, ``<path>\t<reason>`` a line; then one line per class left
                        without any row, ``class:<name>\tdropped: all its <n> images were skipped``
    meta.json           everything that made the key (model, weights and hash, layers, crops, ...), and
                        ``empty_classes``: the names of the classes without any row, in class order
    DONE                written last, the manifest: ``{"format": 1, "algorithm": "sha256", "files": {name:
                        {"size": bytes, "sha256": hex}}}`` for every file above; a folder without it is never taken
                        as a finished embedding

Text files are UTF-8, one item per line, each line ended by exactly ``\n`` (read them with ``split("\n")`` of the
content minus its final ``\n``, never ``splitlines()``, which also splits on U+2028, U+0085, \x0b...). Inside an
item four characters are escaped: backslash as ``\\``, newline as ``\n``, carriage return as ``\r`` and tab as
``\t`` (two characters each), so any file or class name survives the round trip (:func:`escape`,
:func:`unescape`); bytes of a name that are not UTF-8 are kept as they are (``surrogateescape``). A reason never
holds a tab, so a ``skipped.txt`` line splits at its last tab.

The manifest is checked (:func:`damage`) before an entry is used: extraction moves a damaged entry aside
(:func:`move_aside`, never deleting it) and extracts it again, :func:`load_embedding` refuses it naming the file.
A folder whose DONE holds no manifest (written before it existed) counts as damaged: it is moved aside and rebuilt.

Extraction writes it (``featstudy.extraction``); analyses only read it through :func:`load_embedding`.

This package is the one owner of that layout: :mod:`~featstudy.store.files` (file names, text format, atomic
writes), :mod:`~featstudy.store.writer` (the one writer: :func:`begin`, :func:`fill_features`, :func:`finish`;
:func:`write_embedding`), :mod:`~featstudy.store.integrity` (DONE's manifest, :func:`damage`, :func:`move_aside`),
:mod:`~featstudy.store.reader` (:class:`Embedding`, :func:`load_embedding`). Every public name is importable from
``featstudy.store`` itself.
"""

from featstudy.store.files import (CLASS_PREFIX, DAMAGED_MARKER, DONE_MARKER, FILES, HASH, MANIFEST_FORMAT,
                                   EmbeddingError, atomic_file, atomic_save_npy, atomic_write_bytes,
                                   atomic_write_text, dropped_class_line, escape, layer_of, read_items, skipped_line,
                                   unescape, write_items, write_lines)
from featstudy.store.integrity import damage, file_digest, is_complete, move_aside, write_manifest
from featstudy.store.reader import Embedding, load_embedding
from featstudy.store.writer import begin, empty_classes, fill_features, finish, reserve_npy, write_embedding

__all__ = [
    "CLASS_PREFIX", "DAMAGED_MARKER", "DONE_MARKER", "FILES", "HASH", "MANIFEST_FORMAT", "Embedding",
    "EmbeddingError", "atomic_file", "atomic_save_npy", "atomic_write_bytes", "atomic_write_text", "begin", "damage",
    "dropped_class_line", "empty_classes", "escape", "file_digest", "fill_features", "finish", "is_complete",
    "layer_of", "load_embedding", "move_aside", "read_items", "reserve_npy", "skipped_line", "unescape",
    "write_embedding", "write_items", "write_lines", "write_manifest",
]

# their public home, as before the split: tracebacks, reprs and pickles name ``featstudy.store.EmbeddingError``
Embedding.__module__ = EmbeddingError.__module__ = __name__
