"""Omniglot for benchmarks/omniglot.py: the official archives, their images, and episodes.

The data are the official Omniglot archives of Lake et al. (MIT license),
https://github.com/brendenlake/omniglot, folder ``python/``: a set is
``<name>.zip`` or the folder it extracts to. Images are decoded once to 28x28
uint8 tensors (strokes bright on a zero background) and cached.

Episodes are drawn on the images' device with batched indexing: the four
rotations of every character are precomputed as classes, the top k of
uniform keys give every episode its classes and every class its drawings
(:meth:`Episodes.draw`), and one ``index_select`` gathers their images
(:meth:`Episodes.episodes`).
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm import tqdm

SIZE = 28
# The meta-train / test pairs the script knows, preferred first.
SPLITS = (
    ("images_background", "images_evaluation"),
    ("images_background_small1", "images_background_small2"),
)
# SHA-256 of the official archives as downloaded on this project's machine;
# only these are fetched by --download, since only these can be checked.
SHA256 = {
    "images_background_small1": "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4",
    "images_background_small2": "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f",
}
OFFICIAL_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
# Overrides OFFICIAL_URL (a mirror, or a file:// folder in the tests).
URL_VARIABLE = "OMNIGLOT_URL"

Batch = tuple[Tensor, Tensor]


# --------------------------------------------------------------------------- archives


def source(data: Path, name: str) -> Path | None:
    """The archive ``name`` in ``data``: the zip, else the extracted folder, else None."""
    for path in (data / f"{name}.zip", data / name):
        if path.exists():
            return path
    return None


class DownloadError(OSError):
    """An archive could not be fetched; the message says how to get the data by hand."""


def by_hand(data: Path) -> str:
    """How to get the archives without --download."""
    return (
        "download them by hand from https://github.com/brendenlake/omniglot (folder python/, "
        f"MIT license) and pass their folder with --data (now {data})"
    )


def how_to_get(data: Path) -> str:
    """The instructions every missing-data error ends with."""
    names = ", ".join(f"{n}.zip" for n in SHA256)
    return (
        f"Get the Omniglot archives into {data}: rerun with --download (fetches {names} from "
        f"{OFFICIAL_URL}, checked by SHA-256), or {by_hand(data)}."
    )


def default_split(data: Path) -> tuple[str, str]:
    """The first (train, test) pair of sets present in ``data``."""
    for train, test in SPLITS:
        if source(data, train) and source(data, test):
            return train, test
    wanted = " or ".join(f"{a} + {b}" for a, b in SPLITS)
    raise FileNotFoundError(
        f"no Omniglot sets in {data} (expected {wanted}, as .zip or folders). {how_to_get(data)}"
    )


def download(data: Path, names: Sequence[str]) -> list[Path]:
    """Fetch the archives ``names`` missing from ``data``, each checked against its SHA-256.

    The base URL is ``$OMNIGLOT_URL`` if set, else :data:`OFFICIAL_URL`.
    Returns the paths fetched; a failed checksum leaves nothing behind. Raises
    :class:`DownloadError` when an archive cannot be fetched (no network, a bad
    mirror), with the reason and what to do instead.
    """
    missing = [n for n in names if source(data, n) is None]
    unknown = [n for n in missing if n not in SHA256]
    if unknown:
        raise ValueError(
            f"Invalid set to download: {unknown[0]!r} (known checksums: {sorted(SHA256)}); "
            "fetch it by hand from https://github.com/brendenlake/omniglot (folder python/)"
        )
    base = os.environ.get(URL_VARIABLE, OFFICIAL_URL).rstrip("/")
    data.mkdir(parents=True, exist_ok=True)
    fetched = []
    for name in missing:
        dst = data / f"{name}.zip"
        url = f"{base}/{name}.zip"
        try:
            # torch.hub writes to a temporary file and moves it only once the hash matches.
            torch.hub.download_url_to_file(url, str(dst), hash_prefix=SHA256[name])
        except OSError as error:  # URLError, HTTPError, timeouts, refused connections
            reason = getattr(error, "reason", error)
            wanted = " and ".join(f"{n}.zip" for n in missing)
            raise DownloadError(
                f"could not download {url} ({reason}). Without network, get {wanted}: "
                f"{by_hand(data)}; or set ${URL_VARIABLE} to a mirror."
            ) from error
        fetched.append(dst)
    return fetched


def _decode(raw: bytes) -> Tensor:
    from PIL import Image

    img = Image.open(io.BytesIO(raw)).convert("L").resize((SIZE, SIZE), Image.LANCZOS)
    # Omniglot draws black strokes on white; invert so the background is 0.
    return 255 - torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(SIZE, SIZE)


def _read_drawings(path: Path) -> dict[str, list[tuple[str, bytes]]]:
    """``{"alphabet/character": [(file name, png bytes), ...]}`` from a zip or a folder."""
    chars: dict[str, list[tuple[str, bytes]]] = {}
    if path.is_dir():
        files = [(f.relative_to(path).as_posix(), f.read_bytes) for f in path.rglob("*.png")]
    else:
        archive = zipfile.ZipFile(path)
        files = [(n, lambda n=n: archive.read(n)) for n in archive.namelist() if n.endswith(".png")]
    for name, read in files:
        parts = name.split("/")
        chars.setdefault("/".join(parts[-3:-1]), []).append((parts[-1], read()))
    return chars


def load_set(data: Path, name: str, cache: Path) -> tuple[Tensor, list[str]]:
    """``(images, characters)``: uint8 images ``(characters, drawings, 28, 28)``.

    Characters are named ``"alphabet/character"``, sorted.
    """
    path = source(data, name)
    if path is None:
        raise FileNotFoundError(
            f"{name}.zip (or folder {name}/) not found in {data}. " + how_to_get(data)
        )
    size = path.stat().st_size if path.is_file() else sum(1 for _ in path.rglob("*.png"))
    cached = cache / f"{name}-{size}-{SIZE}px.pt"
    if cached.exists():
        blob = torch.load(cached, weights_only=True)
        return blob["images"], blob["characters"]
    chars = _read_drawings(path)
    names = sorted(chars)
    drawings = {len(chars[c]) for c in names}
    if len(drawings) != 1:
        raise ValueError(
            f"{path}: characters have different numbers of drawings: {sorted(drawings)}"
        )
    images = torch.stack(
        [
            torch.stack([_decode(raw) for _, raw in sorted(chars[c])])
            for c in tqdm(names, desc=f"decoding {name}", leave=False)
        ]
    )
    cache.mkdir(parents=True, exist_ok=True)
    # Written whole, then renamed: torchrun's ranks may fill the cache at once.
    partial = cached.with_name(f"{cached.name}.{os.getpid()}")
    torch.save({"images": images, "characters": names}, partial)
    partial.replace(cached)
    return images, names


def alphabet_of(character: str) -> str:
    return character.split("/")[0]


# --------------------------------------------------------------------------- splits


@dataclass
class Split:
    """Episodes of the training, validation and test characters, and their JSON record."""

    train: Episodes
    validation: Episodes | None
    test: Episodes
    record: dict


def _summary(characters: list[str]) -> dict:
    return {"characters": len(characters), "alphabets": dict(Counter(map(alphabet_of, characters)))}


def load_split(
    data: Path,
    cache: Path,
    train_sets: Sequence[str] | None,
    test_set: str | None,
    *,
    val_fraction: float = 0.0,
    val_alphabets: Sequence[str] | None = None,
    seed: int = 0,
    rotations: bool = True,
    device: torch.device | str = "cpu",
) -> Split:
    """Training characters (the union of ``train_sets``), validation characters, test set.

    Missing sets are those of :func:`default_split`. The test set loses every
    character a training set holds; the validation characters are
    :func:`validation_characters` of the training ones.
    """
    if not (train_sets and test_set):
        default_train, default_test = default_split(data)
        train_sets, test_set = train_sets or [default_train], test_set or default_test
    if test_set in train_sets:
        raise ValueError(f"Invalid test set: {test_set!r} is also a training set")
    images: dict[str, Tensor] = {}
    for name in train_sets:
        set_images, chars = load_set(data, name, cache)
        for char, drawings in zip(chars, set_images, strict=True):
            images.setdefault(char, drawings)
    test_images, test_chars = load_set(data, test_set, cache)
    seen = [c for c in test_chars if c in images]
    if len(seen) == len(test_chars):
        raise ValueError(f"Invalid test set: every character of {test_set!r} is a training one")
    validation = validation_characters(sorted(images), val_fraction, val_alphabets, seed)
    held_out = set(validation)
    train = [c for c in sorted(images) if c not in held_out]

    def episodes(chars: list[str], source: dict[str, Tensor]) -> Episodes:
        return Episodes(torch.stack([source[c] for c in chars]).to(device), chars, rotations)

    test = [c for c in test_chars if c not in images]
    record = {
        "train": {"sets": list(train_sets), **_summary(train)},
        "validation": {
            "held_out": "alphabets" if val_alphabets else "random characters",
            **_summary(validation),
            "names": validation,
        },
        "test": {
            "set": test_set,
            **_summary(test),
            "dropped": {"why": "also in a training set", **_summary(seen)},
        },
    }
    return Split(
        train=episodes(train, images),
        validation=episodes(validation, images) if validation else None,
        test=episodes(test, dict(zip(test_chars, test_images, strict=True))),
        record=record,
    )


def validation_characters(
    characters: list[str], fraction: float, alphabets: Sequence[str] | None, seed: int
) -> list[str]:
    """The held-out characters: whole ``alphabets`` if named, else a seeded random fraction."""
    if alphabets:
        unknown = sorted(set(alphabets) - set(map(alphabet_of, characters)))
        if unknown:
            raise ValueError(f"Invalid validation alphabet: {unknown[0]!r} is not a training one")
        return [c for c in characters if alphabet_of(c) in alphabets]
    n = round(fraction * len(characters))
    order = torch.randperm(len(characters), generator=torch.Generator().manual_seed(seed))
    return sorted(characters[i] for i in order[:n].tolist())


# --------------------------------------------------------------------------- episodes


class Episodes:
    """N-way K-shot episodes over characters and their four rotations, drawn on their device.

    Class ``c`` is character ``c // R`` rotated by ``90 * (c % R)`` degrees
    (``R = 4``, or 1 without rotations). An episode has ``N`` distinct classes
    (from one alphabet if ``within_alphabet``) and ``K + Q`` distinct drawings
    of each, the first ``K`` for support and the rest for query, labelled
    ``0..N-1`` class by class.
    """

    def __init__(self, images: Tensor, characters: Sequence[str], rotations: bool = True) -> None:
        if images.shape[0] != len(characters):
            raise ValueError(
                f"Invalid characters: {len(characters)} names for {images.shape[0]} characters"
            )
        self.n_rotations = 4 if rotations else 1
        rotated = torch.stack([images.rot90(r, dims=(2, 3)) for r in range(self.n_rotations)], 1)
        self.n_classes = images.shape[0] * self.n_rotations
        self.n_drawings = images.shape[1]
        # Drawing d of class c is row c * drawings + d: index_select on rows is
        # 15x faster than two-tensor advanced indexing on CPU.
        self.images = rotated.reshape(-1, SIZE, SIZE)
        self.alphabets = sorted({alphabet_of(c) for c in characters})
        ids = [self.alphabets.index(alphabet_of(c)) for c in characters]
        self.alphabet = torch.tensor(ids, device=images.device).repeat_interleave(
            self.n_rotations
        )  # (classes,): the alphabet index of every class
        self._sizes = [ids.count(a) * self.n_rotations for a in range(len(self.alphabets))]
        self._eligible: dict[tuple[int, str], Tensor] = {}

    def draw(
        self,
        n: int,
        ways: int,
        shots: int,
        query: int,
        generator: torch.Generator,
        within_alphabet: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """``(classes, drawings)`` of ``n`` episodes: ``(n, N)`` and ``(n, N, K+Q)`` indices.

        Drawn on the generator's device, in a fixed number of tensor operations.
        """
        if shots < 1 or query < 0 or shots + query > self.n_drawings:
            raise ValueError(
                f"Invalid shots + query: {shots} + {query} (1 to {self.n_drawings} drawings)"
            )
        device = generator.device
        # The k largest of uniform keys: a uniform k-subset in uniform order.
        keys = torch.rand(n, self.n_classes, generator=generator, device=device)
        if within_alphabet:
            eligible = self._eligible_alphabets(ways, device)
            pick = torch.randint(len(eligible), (n,), generator=generator, device=device)
            # Classes of other alphabets get keys in [-1, 0): below all of its own.
            keys -= (self.alphabet.to(device) != eligible[pick, None]).to(keys.dtype)
        elif ways > self.n_classes:
            raise ValueError(
                f"Invalid ways: {ways}-way episodes, the set has {self.n_classes} classes"
            )
        classes = keys.topk(ways, dim=1).indices
        keys = torch.rand(n, ways, self.n_drawings, generator=generator, device=device)
        return classes, keys.topk(shots + query, dim=2).indices

    def _eligible_alphabets(self, ways: int, device: torch.device) -> Tensor:
        key = (ways, str(device))
        if key not in self._eligible:
            ids = [a for a, size in enumerate(self._sizes) if size >= ways]
            if not ids:
                raise ValueError(
                    f"Invalid ways: {ways}-way within-alphabet episodes, the largest alphabet "
                    f"has {max(self._sizes)} classes"
                )
            self._eligible[key] = torch.tensor(ids, device=device)
        return self._eligible[key]

    def episodes(self, classes: Tensor, drawings: Tensor, shots: int) -> tuple[Batch, Batch]:
        """``support, query`` of drawn episodes: images ``(T, N*K or N*Q, 1, 28, 28)`` in [0, 1].

        Labels ``(T, N*K or N*Q)`` are ``0..N-1``, class by class.
        """
        n, ways, per_class = drawings.shape
        rows = (classes[..., None] * self.n_drawings + drawings).flatten()
        x = self.images.index_select(0, rows).view(n, ways, per_class, 1, SIZE, SIZE)
        x = x.float().div_(255)
        labels = torch.arange(ways, device=x.device)
        ys = labels.repeat_interleave(shots).expand(n, -1)
        yq = labels.repeat_interleave(per_class - shots).expand(n, -1)
        return (x[:, :, :shots].flatten(1, 2), ys), (x[:, :, shots:].flatten(1, 2), yq)


def augment(x: Tensor, generator: torch.Generator, shift: float = 2.0) -> Tensor:
    """A random small affine warp of every image ``(..., 1, 28, 28)``, on its device.

    Each image is shifted by up to ``shift`` pixels along each axis, rotated
    by up to 10 degrees, scaled by 0.9-1.1 and sheared by up to 0.1, all
    drawn uniformly; the background stays 0.
    """
    flat = x.reshape(-1, 1, SIZE, SIZE)
    u = torch.rand(flat.shape[0], 5, generator=generator, device=x.device).mul_(2).sub_(1)
    angle, scale = u[:, 0] * math.radians(10), 1 + 0.1 * u[:, 1]
    cos, sin = scale * angle.cos(), scale * angle.sin()
    # affine_grid works in [-1, 1] coordinates, where a pixel is 2 / SIZE wide.
    t = u[:, 3:] * (2 * shift / SIZE)
    theta = torch.stack(
        [
            torch.stack([cos, -sin + 0.1 * u[:, 2], t[:, 0]], dim=1),
            torch.stack([sin, cos, t[:, 1]], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
    return F.grid_sample(flat, grid, align_corners=False).view_as(x)
