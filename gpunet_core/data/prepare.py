"""Dataset preparation: real sources -> a canonical ImageFolder tree plus ``manifest.json``.

Output layout (local directory or ``s3://bucket/prefix``)::

    train/<class>/<image>.JPEG      RGB JPEGs (non-JPEG / CMYK / grayscale inputs re-encoded)
    val/<class>/<image>.JPEG
    quarantine/<split>/<class>/...  undecodable or truncated inputs, kept for inspection
    SHA256SUMS                      ``sha256sum -c`` compatible checksum of every image
    manifest.json                   written last: its presence means the dataset is complete

Sources: the official ILSVRC2012 archives (streamed, never extracted to a temp copy), an
existing ImageFolder tree (local or S3), and the embedded ``digits`` demo set built offline
from scikit-learn's bundled handwritten digits. Decode/verify runs over ``jobs`` worker
processes; re-running on the same input reuses finished files and yields the same manifest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import tarfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile
from tqdm import tqdm

from gpunet_core.data.folder import IMAGE_EXTENSIONS
from gpunet_core.utils import storage
from gpunet_core.utils.errors import DataError
from gpunet_core.utils.files import MANIFEST_FILE, check_output_dir, write_bytes

log = logging.getLogger(__name__)

CHECKSUMS = "SHA256SUMS"
FORMAT = "gpunet-imagefolder/1"
SPLITS = ("train", "val")
SOURCE_EXTENSIONS = (*IMAGE_EXTENSIONS, ".gif")  # GIFs are decoded and written as JPEG
JPEG_QUALITY = 95


@dataclass(frozen=True)
class Record:
    """One source image: where it goes (split/class/name) and its raw bytes."""

    split: str
    cls: str
    name: str
    data: bytes
    origin: str  # human-readable source location for messages


@dataclass(frozen=True)
class Decoded:
    """Result of decoding/verifying one record in a worker."""

    data: bytes | None
    size: tuple[int, int] = (0, 0)
    converted_from: str | None = None
    error: str | None = None


@dataclass
class PrepareSummary:
    """What a ``prepare_*`` call did; ``manifest`` is the dataset's manifest.json content."""

    location: str
    manifest: dict[str, Any]
    written: int = 0
    reused: int = 0
    quarantined: int = 0
    uploaded: int = 0
    up_to_date: bool = False

    def describe(self) -> str:
        m = self.manifest
        counts = ", ".join(f"{s}={m['splits'][s]['count']}" for s in m["splits"])
        if self.up_to_date:
            return f"{self.location}: already prepared ({counts}, {len(m['classes'])} classes)"
        return (f"{self.location}: {len(m['classes'])} classes, {counts}; written "
                f"{self.written}, reused {self.reused}, quarantined {self.quarantined}, "
                f"converted {len(m['converted'])}, uploaded {self.uploaded}, "
                f"{m['total_bytes'] / 1e6:.1f} MB")


# --------------------------------------------------------------------------- decoding


def decode_image(data: bytes) -> Decoded:
    """Fully decode ``data``; return it as RGB JPEG bytes (unchanged when already RGB JPEG).

    PNG-under-a-JPEG-name, CMYK and grayscale inputs are re-encoded; truncated or
    undecodable inputs come back with ``error`` set instead of raising.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt, mode, size = img.format, img.mode, img.size
            if fmt == "JPEG" and mode == "RGB":
                return Decoded(data, size)
            rgb = img.convert("RGB")
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBomb...
        return Decoded(None, error=f"undecodable: {type(exc).__name__}: {exc}")
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
    return Decoded(out.getvalue(), size, converted_from=fmt if fmt != "JPEG" else mode)


def _source_kind(data: bytes) -> str:
    """What a re-encoded input was (format, or mode for non-RGB JPEG), from its header only."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format if img.format != "JPEG" else img.mode
    except Exception:
        return "unknown"


def _decode_record(record: Record) -> Decoded:
    return decode_image(record.data)


def _bounded_map(fn: Callable[[Record], Decoded], items: Iterable[Record],
                 jobs: int) -> Iterator[tuple[Record, Decoded]]:
    """``(item, fn(item))`` in input order over ``jobs`` processes, with bounded look-ahead."""
    if jobs <= 1:
        for item in items:
            yield item, fn(item)
        return
    window = jobs * 32
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        pending: list = []
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= window:
                head, fut = pending.pop(0)
                yield head, fut.result()
        for head, fut in pending:
            yield head, fut.result()


# --------------------------------------------------------------------------- writing


def _output_name(name: str) -> str:
    stem, ext = os.path.splitext(name)
    return name if ext.lower() in (".jpg", ".jpeg") else f"{stem}.jpg"


def _image_size_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def _size_stats(sizes: list[tuple[int, int]]) -> dict[str, Any]:
    if not sizes:
        return {}
    ws, hs = [w for w, _ in sizes], [h for _, h in sizes]
    return {"min_width": min(ws), "max_width": max(ws), "mean_width": round(sum(ws) / len(ws), 2),
            "min_height": min(hs), "max_height": max(hs),
            "mean_height": round(sum(hs) / len(hs), 2)}


@dataclass
class _Writer:
    """Writes decoded records under ``root`` and collects everything the manifest needs."""

    root: Path
    jobs: int = 1
    progress: bool = True
    files: dict[str, tuple[str, int, tuple[int, int]]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    converted: list[dict[str, str]] = field(default_factory=list)
    written: int = 0
    reused: int = 0

    def run(self, records: Iterable[Record], total: int | None, desc: str) -> None:
        with tqdm(total=total, unit="img", desc=desc, disable=not self.progress) as bar:
            fresh = (r for r in self._reuse_existing(records, bar))
            for record, decoded in _bounded_map(_decode_record, fresh, self.jobs):
                self._store(record, decoded)
                bar.update()

    def _reuse_existing(self, records: Iterable[Record], bar) -> Iterator[Record]:
        """Yield only records whose output does not exist yet; account for the others."""
        for record in records:
            rel = f"{record.split}/{record.cls}/{_output_name(record.name)}"
            if rel in self.files:
                raise DataError(f"two source files map to {rel} (second: {record.origin}); "
                                "rename one of them")
            path = self.root / rel
            if path.is_file() and not self._quarantine_path(record).exists():
                data = path.read_bytes()
                self.files[rel] = (hashlib.sha256(data).hexdigest(), len(data),
                                   _image_size_of(path))
                if data != record.data:
                    self.converted.append({"path": rel, "from": _source_kind(record.data)})
                self.reused += 1
                bar.update()
                continue
            yield record

    def _quarantine_path(self, record: Record) -> Path:
        return self.root / "quarantine" / record.split / record.cls / record.name

    def _store(self, record: Record, decoded: Decoded) -> None:
        rel = f"{record.split}/{record.cls}/{_output_name(record.name)}"
        if decoded.data is None:
            qpath = self._quarantine_path(record)
            write_bytes(qpath, record.data)
            self.skipped.append({"path": rel, "source": record.origin,
                                 "quarantine": qpath.relative_to(self.root).as_posix(),
                                 "reason": decoded.error or "undecodable"})
            return
        write_bytes(self.root / rel, decoded.data)
        if decoded.converted_from:
            self.converted.append({"path": rel, "from": decoded.converted_from})
        self.files[rel] = (hashlib.sha256(decoded.data).hexdigest(), len(decoded.data),
                           decoded.size)
        self.written += 1

    def manifest(self, source: dict[str, Any], classes: list[str],
                 max_bad_fraction: float) -> dict[str, Any]:
        """Check the bad fraction and write SHA256SUMS; return the manifest (not yet written)."""
        bad, good = len(self.skipped), len(self.files)
        if good == 0:
            raise DataError(f"no usable images were found in the source ({bad} undecodable); "
                            "check the input paths")
        if bad / (bad + good) > max_bad_fraction:
            raise DataError(f"{bad} of {bad + good} images are undecodable "
                            f"({bad / (bad + good):.2%} > --max-bad-fraction "
                            f"{max_bad_fraction:.2%}); see {self.root / 'quarantine'}; the "
                            "dataset was not marked complete")
        lines = [f"{digest}  {rel}\n" for rel, (digest, _, _) in sorted(self.files.items())]
        write_bytes(self.root / CHECKSUMS, "".join(lines).encode())
        splits: dict[str, Any] = {}
        by_split: dict[str, list[str]] = defaultdict(list)
        for rel in sorted(self.files):
            by_split[rel.split("/", 1)[0]].append(rel)
        for split in sorted(by_split, key=lambda s: (s not in SPLITS, s)):
            rels = by_split[split]
            per_class = Counter(rel.split("/")[1] for rel in rels)
            split_lines = "".join(f"{self.files[r][0]}  {r}\n" for r in rels)
            splits[split] = {
                "count": len(rels),
                "bytes": sum(self.files[r][1] for r in rels),
                "per_class": {c: per_class.get(c, 0) for c in classes},
                "image_size": _size_stats([self.files[r][2] for r in rels]),
                "checksum": hashlib.sha256(split_lines.encode()).hexdigest(),
            }
        return {
            "format": FORMAT,
            "source": source,
            "classes": classes,
            "num_classes": len(classes),
            "splits": splits,
            "total_bytes": sum(size for _, size, _ in self.files.values()),
            "checksum_file": CHECKSUMS,
            "checksum": hashlib.sha256("".join(lines).encode()).hexdigest(),
            "skipped": sorted(self.skipped, key=lambda s: s["path"]),
            "converted": sorted(self.converted, key=lambda s: s["path"]),
        }


# --------------------------------------------------------------------------- driver


def _fingerprint(source: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()


def dataset_identity(split_dir: str | Path) -> dict[str, Any] | None:
    """Which prepared dataset and split ``split_dir`` (``<dataset>/<split>``) is: the manifest
    checksum (the identity promotion compares), the split and its own checksum; None for a
    folder outside a prepared dataset."""
    split_dir = Path(split_dir)
    manifest = read_manifest(split_dir.parent)
    if manifest is None or not manifest.get("checksum"):
        return None
    split = (manifest.get("splits") or {}).get(split_dir.name) or {}
    return {"checksum": manifest["checksum"], "split": split_dir.name,
            "split_checksum": split.get("checksum"), "source": manifest.get("source"),
            "images": split.get("count")}


def read_manifest(location: str | Path, *, s3_endpoint: str | None = None) -> dict | None:
    """The manifest of a prepared dataset (local dir or s3:// prefix), or None if incomplete."""
    if storage.is_s3_uri(str(location)):
        uri = storage.parse_s3_uri(str(location)).join(MANIFEST_FILE)
        client = storage.s3_client(s3_endpoint)
        storage.check_bucket(uri, client)
        if not storage.object_exists(uri, client):
            return None
        data = storage.read_bytes(uri, client)
    else:
        path = Path(location) / MANIFEST_FILE
        if not path.is_file():
            return None
        data = path.read_bytes()
    try:
        return json.loads(data)
    except ValueError as exc:
        raise DataError(f"{location}/{MANIFEST_FILE} is not valid JSON ({exc}); delete it and "
                        "re-run prepare") from None


def _staging_dir(out: str, work_dir: str | Path | None) -> Path:
    if work_dir:
        return Path(work_dir)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpunet" / "prepare"
    return cache / hashlib.sha256(out.encode()).hexdigest()[:16]


def _prepare(out: str | Path, source: dict[str, Any], classes: list[str],
             records: Callable[[], Iterable[Record]], *, total: int | None, jobs: int,
             max_bad_fraction: float, s3_endpoint: str | None, work_dir: str | Path | None,
             progress: bool) -> PrepareSummary:
    """Shared tail of every source: resume check, decode/write, manifest, optional upload."""
    out = str(out)
    if not 0.0 <= max_bad_fraction < 1.0:
        raise DataError(f"--max-bad-fraction must be in [0, 1), got {max_bad_fraction}")
    remote = storage.is_s3_uri(out)
    # an s3:// dataset is staged locally first (--work-dir, by default in the cache)
    check_output_dir(_staging_dir(out, work_dir) if remote else out,
                     "--work-dir" if remote else "--out", error=DataError)
    source = {**source, "fingerprint": _fingerprint(source)}
    existing = read_manifest(out, s3_endpoint=s3_endpoint)
    if existing is not None:
        if existing.get("source", {}).get("fingerprint") == source["fingerprint"]:
            return PrepareSummary(out, existing, up_to_date=True)
        raise DataError(f"{out} already holds a different prepared dataset (source "
                        f"{existing.get('source', {}).get('type')}); choose another --out or "
                        "delete it")
    root = _staging_dir(out, work_dir) if remote else Path(out)
    root.mkdir(parents=True, exist_ok=True)
    writer = _Writer(root, jobs=max(1, jobs), progress=progress)
    writer.run(records(), total, desc=f"prepare {source['type']}")
    manifest = writer.manifest(source, classes, max_bad_fraction)
    payload = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
    summary = PrepareSummary(out, manifest, writer.written, writer.reused, len(writer.skipped))
    write_bytes(root / MANIFEST_FILE, payload)
    if remote:
        summary.uploaded = publish_dataset(root, out, s3_endpoint=s3_endpoint, jobs=jobs,
                                           progress=progress)
    log.debug("%s", summary.describe())
    return summary


def publish_dataset(root: str | Path, dest: str, *, s3_endpoint: str | None = None,
                    jobs: int = 4, progress: bool = True) -> int:
    """Upload the prepared dataset at ``root`` to the ``s3://`` prefix ``dest``; returns how many
    of its files had to be sent (the manifest not counted).

    Every file but ``manifest.json`` goes first (verified, resumable: what already landed is
    skipped), the manifest last, so a reader never sees a complete-looking partial dataset.
    """
    root = Path(root)
    if not (root / MANIFEST_FILE).is_file():
        raise DataError(f"{root} is not a prepared dataset ({MANIFEST_FILE} missing); run "
                        "gpunet prepare first")
    target = storage.parse_s3_uri(dest)
    client = storage.s3_client(s3_endpoint, max_pool_connections=max(10, jobs * 4))
    sent = storage.upload_dir(root, target, exclude=[MANIFEST_FILE, *_local_only(root)],
                              client=client, jobs=max(4, jobs * 2), progress=progress)
    storage.upload_file(root / MANIFEST_FILE, target.join(MANIFEST_FILE), client=client)
    return sent


def _local_only(root: Path) -> list[str]:
    """Files of a dataset directory that are not part of the dataset (cache markers, locks)."""
    return [p.relative_to(root).as_posix() for p in root.rglob(".*") if p.is_file()]


# --------------------------------------------------------------------------- digits


def prepare_digits(out: str | Path, *, img_size: int = 32, val_fraction: float = 0.2,
                   seed: int = 0, per_class: int | None = None, jobs: int = 1, s3_endpoint: str | None = None,
                   work_dir: str | Path | None = None, progress: bool = False) -> PrepareSummary:
    """The embedded demo set: scikit-learn's 1,797 8x8 handwritten digits as RGB JPEGs.

    Each image is upscaled (bicubic) to ``img_size`` px; the train/val split is stratified
    and fixed by ``seed``, so the same arguments always give byte-identical files.
    """
    if not 8 <= img_size <= 1024:
        raise DataError(f"--img-size must be in [8, 1024], got {img_size}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if per_class is not None and per_class < 2:
        raise DataError(f"--per-class must be >= 2, got {per_class}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = list(range(len(digits.target)))
    classes = [str(c) for c in sorted(set(digits.target.tolist()))]
    if per_class is not None:
        keep: list[int] = []
        for label in sorted(set(digits.target.tolist())):
            keep += [i for i in indices if digits.target[i] == label][:per_class]
        indices = sorted(keep)
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, random_state=seed,
                                          stratify=digits.target[indices])
    split_of = {i: "train" for i in train_idx} | {i: "val" for i in val_idx}

    def records() -> Iterator[Record]:
        for i in indices:
            yield Record(split_of[i], str(int(digits.target[i])), f"digit_{i:04d}.jpg",
                         _render_digit(digits.images[i], img_size), f"sklearn digits #{i}")

    source = {"type": "digits", "origin": "sklearn.datasets.load_digits", "img_size": img_size,
              "val_fraction": val_fraction, "seed": seed}
    if per_class is not None:
        source["per_class"] = per_class
    return _prepare(out, source, classes, records, total=len(indices), jobs=jobs,
                    max_bad_fraction=0.0, s3_endpoint=s3_endpoint, work_dir=work_dir,
                    progress=progress)


def _render_digit(image, img_size: int) -> bytes:
    gray = Image.fromarray((np.asarray(image) * (255.0 / 16.0)).round().astype("uint8"), "L")
    rgb = gray.resize((img_size, img_size), Image.Resampling.BICUBIC).convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


# --------------------------------------------------------------------------- folder


def prepare_folder(src: str | Path, out: str | Path, *, jobs: int = 1,
                   max_bad_fraction: float = 0.01, s3_endpoint: str | None = None,
                   work_dir: str | Path | None = None, progress: bool = True) -> PrepareSummary:
    """An existing ``SRC/{train,val}/<class>/<image>`` tree (local or ``s3://``) re-checked."""
    src = str(src)
    if storage.is_s3_uri(src):
        cache = _staging_dir(src, None).with_name(
            "src-" + hashlib.sha256(src.encode()).hexdigest()[:16])
        root = storage.download(src, cache, client=storage.s3_client(s3_endpoint),
                                progress=progress)
    else:
        root = Path(src)
    if not root.is_dir():
        raise DataError(f"source folder not found: {src}; pass an existing "
                        "SRC/{train,val}/<class>/<images> tree or an s3:// prefix")
    splits = [s for s in SPLITS if (root / s).is_dir()]
    if not splits:
        raise DataError(f"{src} has no train/ or val/ directory; expected "
                        "SRC/train/<class>/<images> and/or SRC/val/<class>/<images>")
    listing: dict[str, dict[str, list[Path]]] = {}
    for split in splits:
        listing[split] = {}
        for cls_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            images = sorted(p for p in cls_dir.iterdir() if p.is_file()
                            and not p.name.startswith(".")
                            and p.suffix.lower() in SOURCE_EXTENSIONS)
            if not images:
                raise DataError(f"class {cls_dir.name!r} in {cls_dir} has no images; add "
                                "images or remove the empty directory")
            listing[split][cls_dir.name] = images
        if not listing[split]:
            raise DataError(f"{root / split} has no class directories")
    classes = _check_classes({s: set(c) for s, c in listing.items()}, src)

    def records() -> Iterator[Record]:
        for split, per_class in listing.items():
            for cls, images in per_class.items():
                for path in images:
                    yield Record(split, cls, path.name, path.read_bytes(), str(path))

    total = sum(len(v) for c in listing.values() for v in c.values())
    source = {"type": "folder", "src": src if storage.is_s3_uri(src) else str(root.resolve()),
              "files": total}
    return _prepare(out, source, classes, records, total=total, jobs=jobs,
                    max_bad_fraction=max_bad_fraction, s3_endpoint=s3_endpoint,
                    work_dir=work_dir, progress=progress)


def _check_classes(classes_by_split: dict[str, set[str]], where: str) -> list[str]:
    """Sorted class list (ImageFolder index order); val classes must all exist in train."""
    if "train" in classes_by_split and "val" in classes_by_split:
        extra = sorted(classes_by_split["val"] - classes_by_split["train"])
        if extra:
            raise DataError(f"{where}: class(es) {', '.join(extra[:5])} are in val but not in "
                            "train; a model cannot learn them - fix the labels or add training "
                            "images")
    return sorted(set().union(*classes_by_split.values()))


# --------------------------------------------------------------------------- imagenet


def read_val_labels(path: str | Path) -> dict[str, str]:
    """``{image stem: wnid}`` from Kaggle's LOC_val_solution.csv or a ``filename wnid`` file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"cannot read validation labels {path}: {exc.strerror}") from None
    labels: dict[str, str] = {}
    lines = text.splitlines()
    if lines and lines[0].replace(" ", "").lower().startswith("imageid,predictionstring"):
        for n, row in enumerate(csv.reader(lines[1:]), start=2):
            if not row:
                continue
            if len(row) < 2 or not row[1].split():
                raise DataError(f"{path}:{n}: expected 'ImageId,PredictionString', got {row}")
            labels[Path(row[0].strip()).stem] = row[1].split()[0]
    else:
        for n, line in enumerate(lines, start=1):
            parts = line.replace(",", " ").split()
            if not parts or line.lstrip().startswith("#"):
                continue
            if len(parts) != 2:
                raise DataError(f"{path}:{n}: expected 'filename wnid', got {line!r}")
            labels[Path(parts[0]).stem] = parts[1]
    if not labels:
        raise DataError(f"validation label file {path} has no entries")
    return labels


def _open_tar(path: str | Path, what: str) -> tarfile.TarFile:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        return tarfile.open(path, mode="r:*")
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"{what} {path} is not a readable tar archive: {exc}") from None


def _tar_files(path: str | Path, what: str) -> list[str]:
    """Names of the regular files in a tar archive; a truncated or damaged one is a DataError."""
    with _open_tar(path, what) as tar:
        try:
            return [m.name for m in tar.getmembers() if m.isfile()]
        except (OSError, EOFError, tarfile.TarError) as exc:
            raise DataError(f"{what} {path} is truncated or damaged ({exc}); download it "
                            "again") from None


def _tar_stat(path: str | Path) -> dict[str, Any]:
    st = Path(path).stat()
    return {"name": Path(path).name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def prepare_imagenet(out: str | Path, *, train_tar: str | Path | None = None,
                     val_tar: str | Path | None = None, val_labels: str | Path | None = None,
                     jobs: int = 1, max_bad_fraction: float = 0.01,
                     s3_endpoint: str | None = None, work_dir: str | Path | None = None,
                     progress: bool = True) -> PrepareSummary:
    """ILSVRC2012 as downloaded: a train tar of ``<wnid>.tar`` tars and a flat val tar.

    Archives are streamed member by member; any number of classes works. Labels and class
    sets are cross-checked before any image is written.
    """
    if train_tar is None and val_tar is None:
        raise DataError("give --train-tar and/or --val-tar")
    if (val_tar is None) != (val_labels is None):
        raise DataError("--val-tar and --val-labels go together")
    classes_by_split: dict[str, set[str]] = {}
    train_members: list[str] = []
    if train_tar is not None:
        train_members = _tar_files(train_tar, "train archive")
        not_tars = [n for n in train_members if not n.endswith(".tar")]
        if not_tars:
            raise DataError(f"{train_tar} should hold one <wnid>.tar per class, found "
                            f"{not_tars[0]!r}; is this ILSVRC2012_img_train.tar?")
        if not train_members:
            raise DataError(f"train archive {train_tar} holds no class tars")
        classes_by_split["train"] = {Path(n).name[:-4] for n in train_members}
    val_names: dict[str, str] = {}
    if val_tar is not None:
        labels = read_val_labels(val_labels)
        val_names = {Path(n).stem: n for n in _tar_files(val_tar, "validation archive")}
        unlabeled = sorted(set(val_names) - set(labels))
        missing = sorted(set(labels) - set(val_names))
        if unlabeled:
            raise DataError(f"{len(unlabeled)} image(s) in {val_tar} have no label in "
                            f"{val_labels} (first: {unlabeled[0]}); use the label file that "
                            "matches this archive")
        if missing:
            raise DataError(f"{val_labels} names {len(missing)} image(s) absent from "
                            f"{val_tar} (first: {missing[0]}); is the archive incomplete?")
        classes_by_split["val"] = set(labels.values())
    classes = _check_classes(classes_by_split, "imagenet")

    def records() -> Iterator[Record]:
        if train_tar is not None:
            yield from _train_records(train_tar)
        if val_tar is not None:
            with tarfile.open(val_tar, mode="r:*") as tar:
                for member in tar:
                    if member.isfile():
                        stem = Path(member.name).stem
                        yield Record("val", labels[stem], Path(member.name).name,
                                     _read_member(tar, member, val_tar), f"{val_tar}:{member.name}")

    source: dict[str, Any] = {"type": "imagenet"}
    if train_tar is not None:
        source["train_tar"] = _tar_stat(train_tar)
    if val_tar is not None:
        source["val_tar"] = _tar_stat(val_tar)
        source["val_labels"] = {"name": Path(val_labels).name,
                                "sha256": hashlib.sha256(Path(val_labels).read_bytes())
                                .hexdigest()}
    return _prepare(out, source, classes, records, total=None if train_tar else len(val_names),
                    jobs=jobs, max_bad_fraction=max_bad_fraction, s3_endpoint=s3_endpoint,
                    work_dir=work_dir, progress=progress)


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, where: Any) -> bytes:
    try:
        fh = tar.extractfile(member)
        return fh.read() if fh is not None else b""
    except (OSError, tarfile.TarError) as exc:
        raise DataError(f"cannot read {member.name} from {where}: {exc}; the archive is "
                        "damaged - download it again") from None


def _train_records(train_tar: str | Path) -> Iterator[Record]:
    with tarfile.open(train_tar, mode="r:*") as outer:
        for class_member in outer:
            if not class_member.isfile():
                continue
            wnid = Path(class_member.name).name[:-4]
            fh = outer.extractfile(class_member)
            count = 0
            try:
                with tarfile.open(fileobj=fh, mode="r|*") as inner:
                    for member in inner:
                        if member.isfile():
                            count += 1
                            yield Record("train", wnid, Path(member.name).name,
                                         _read_member(inner, member, class_member.name),
                                         f"{train_tar}:{class_member.name}:{member.name}")
            except tarfile.TarError as exc:
                raise DataError(f"class archive {class_member.name} in {train_tar} is not a "
                                f"readable tar ({exc}); download the archive again") from None
            if count == 0:
                raise DataError(f"class {wnid} ({class_member.name} in {train_tar}) has no "
                                "images; remove it or fix the archive")

