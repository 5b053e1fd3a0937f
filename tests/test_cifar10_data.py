"""CIFAR-10 readers: the three layouts, safe unpickling, clear errors on bad paths and files."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from discretelik.data import cifar10, load_bundled
from discretelik.data.cifar10 import UnsafePickleError, load_cifar10, read_cifar10_pickle

SHARED = Path("/work/shared/data/cifar10")
TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def _images(n: int, seed: int) -> np.ndarray:
    """Random uint8 NHWC images (N, 32, 32, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _planar(x: np.ndarray) -> np.ndarray:
    """NHWC -> the official (N, 3072) channel-planar rows."""
    return x.transpose(0, 3, 1, 2).reshape(len(x), -1)


def _write_official(folder: Path, sizes: dict[str, int], py2_style: bool) -> dict[str, tuple]:
    """Write pickled batches like the official archive; returns name -> (NHWC images, labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for k, (name, n) in enumerate(sizes.items()):
        x, y = _images(n, k), [int(v) for v in np.arange(n) % 10]
        if py2_style:  # bytes keys and protocol 2, as Python 2's cPickle wrote them
            obj = {b"batch_label": name.encode(), b"labels": y, b"data": _planar(x),
                   b"filenames": [b"img%d.png" % i for i in range(n)]}
            data = pickle.dumps(obj, protocol=2)
        else:
            obj = {"batch_label": name, "labels": y, "data": _planar(x)}
            data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        (folder / name).write_bytes(data)
        written[name] = (x, np.array(y))
    return written


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("py2_style", [True, False])
def test_official_pickles(tmp_path: Path, py2_style: bool) -> None:
    sizes = {**{n: 3 for n in TRAIN}, "test_batch": 2}
    written = _write_official(tmp_path / "cifar-10-batches-py", sizes, py2_style)
    for split, names in (("train", TRAIN), ("test", ["test_batch"])):
        for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent or the folder itself
            x, y = load_cifar10(root, split)
            assert x.dtype == torch.uint8 and y.dtype == torch.int64
            assert torch.equal(x, torch.cat([_nchw(written[n][0]) for n in names]))
            assert torch.equal(y, torch.cat([torch.from_numpy(written[n][1]) for n in names]))


def test_shared_npz_layout_and_single_npz(tmp_path: Path) -> None:
    parts = {n: (_images(4, i), np.arange(4, dtype=np.uint8) + i) for i, n in enumerate(TRAIN)}
    parts["test_batch"] = (_images(2, 9), np.array([9, 0], dtype=np.uint8))
    for name, (x, y) in parts.items():
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
    x, y = load_cifar10(tmp_path, "train")
    assert x.shape == (20, 3, 32, 32)
    assert torch.equal(x[4:8], _nchw(parts["data_batch_2"][0]))
    assert y.tolist()[4:8] == [1, 2, 3, 4]
    single = tmp_path / "cifar.npz"
    np.savez(single, x_train=parts["data_batch_1"][0], y_train=parts["data_batch_1"][1],
             x_test=parts["test_batch"][0], y_test=parts["test_batch"][1])
    xt, yt = load_cifar10(single, "test")
    assert torch.equal(xt, _nchw(parts["test_batch"][0])) and yt.tolist() == [9, 0]


class _Exploit:
    """Pickles to a call of os.system: what the restricted unpickler must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_before_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "data_batch_1"
    bad.write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0],
                                  "x": _Exploit(marker)}))
    with pytest.raises(UnsafePickleError, match=r"refusing to load global (posix|os|nt)\.system"):
        read_cifar10_pickle(bad)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content, match",
    [
        (b"not a pickle at all", "not a readable CIFAR-10 python batch"),
        (pickle.dumps([1, 2, 3]), "expected a pickled dict"),
        (pickle.dumps({"labels": [0]}), "missing \\['data'\\]"),
        (pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}),
         r"'data' must be a uint8 array \(N, 3072\)"),
        (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}),
         "2 images but 1 labels"),
        (pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [10]}),
         r"labels must lie in \[0, 9\]"),
    ],
)
def test_malformed_pickles_name_the_file(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "data_batch_1"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as info:
        read_cifar10_pickle(path)
    assert str(path) in str(info.value)


def test_malformed_npz_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a readable .npz file"):
        load_cifar10(garbage)
    missing = tmp_path / "missing.npz"
    np.savez(missing, x_train=_images(1, 0))
    with pytest.raises(ValueError, match=r"missing \['y_train'\]"):
        load_cifar10(missing)
    nchw = tmp_path / "nchw.npz"
    np.savez(nchw, x_train=np.zeros((1, 3, 32, 32), np.uint8), y_train=np.zeros(1, np.uint8))
    with pytest.raises(ValueError, match=r"uint8 \(N, 32, 32, 3\) NHWC"):
        load_cifar10(nchw)
    objects = tmp_path / "objects.npz"
    np.savez(objects, x_train=np.array([None], dtype=object), y_train=np.zeros(1, np.uint8))
    with pytest.raises(ValueError, match=str(objects)):  # allow_pickle=False refuses it
        load_cifar10(objects)


def test_wrong_path_says_where_to_put_the_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_cifar10(tmp_path / "nowhere")
    message = str(info.value)
    assert "nowhere" in message and "cifar-10-batches-py" in message
    assert "data_batch_1.npz" in message and "x_train" in message and "download" in message
    (tmp_path / "data_batch_1").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_cifar10(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        load_cifar10(tmp_path, "val")
    with pytest.raises(TypeError, match="root must be a path"):
        load_cifar10(3)  # type: ignore[arg-type]


# --- download=True, offline: the "official archive" is a small tarball built here and served
# through a file:// URL, so the real fetch, checksum and extraction code runs without a network.


def _archive(tmp_path: Path, extra: Callable[[tarfile.TarFile], None] | None = None,
             leave_out: str = "") -> tuple:
    """A cifar-10-python.tar.gz of tiny official pickles (less the member ``leave_out``), with
    ``extra`` members added last; returns (url, md5, written)."""
    staged = tmp_path / "staged"
    written = _write_official(staged / "cifar-10-batches-py",
                              {**{n: 2 for n in TRAIN}, "test_batch": 3}, py2_style=True)
    (staged / "cifar-10-batches-py" / "batches.meta").write_bytes(b"meta")
    path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(staged / "cifar-10-batches-py", arcname="cifar-10-batches-py",
                filter=lambda member: None if member.name == leave_out else member)
        if extra is not None:
            extra(tar)
    return path.as_uri(), hashlib.md5(path.read_bytes()).hexdigest(), written


def _serve(monkeypatch: pytest.MonkeyPatch, url: str, md5: str) -> None:
    monkeypatch.setattr(cifar10, "_OFFICIAL_URL", url)
    monkeypatch.setattr(cifar10, "_OFFICIAL_MD5", md5)


def test_download_fetches_checks_and_extracts(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    url, md5, written = _archive(tmp_path)
    _serve(monkeypatch, url, md5)
    root = tmp_path / "data"
    x, y = load_cifar10(root, "test", download=True)
    assert torch.equal(x, _nchw(written["test_batch"][0]))
    assert torch.equal(y, torch.from_numpy(written["test_batch"][1]))
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # no temp left
    assert sorted(p.name for p in (root / "cifar-10-batches-py").iterdir()) == sorted(
        [*TRAIN, "test_batch"]
    )
    monkeypatch.setattr(cifar10, "_OFFICIAL_URL", (tmp_path / "gone.tar.gz").as_uri())
    x_train, _ = load_cifar10(root, "train", download=True)  # present now: nothing fetched
    assert x_train.shape == (10, 3, 32, 32)


def test_download_with_a_wrong_checksum_extracts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, md5, _ = _archive(tmp_path)
    _serve(monkeypatch, url, "0" * 32)
    root = tmp_path / "data"
    with pytest.raises(FileNotFoundError, match=f"has MD5 {md5}, expected 0{{32}}"):
        load_cifar10(root, "train", download=True)
    assert list(root.iterdir()) == []


def test_download_failure_names_the_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = (tmp_path / "nowhere.tar.gz").as_uri()
    _serve(monkeypatch, missing, "0" * 32)
    with pytest.raises(FileNotFoundError, match="download of .*nowhere.tar.gz failed") as info:
        load_cifar10(tmp_path / "data", download=True)
    assert "cifar-10-batches-py" in str(info.value)  # and still where to put the files
    assert list((tmp_path / "data").iterdir()) == []


def test_download_applies_no_member_path_or_link(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def evil(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("../escaped")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))

    url, md5, _ = _archive(tmp_path, evil)
    _serve(monkeypatch, url, md5)
    root = tmp_path / "data"
    load_cifar10(root, "train", download=True)
    assert not (tmp_path / "escaped").exists() and not (root / "escaped").exists()

    # A batch that is a link (to anywhere) is refused, and nothing is left behind.
    def link(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)

    linked = tmp_path / "linked"
    linked.mkdir()
    url, md5, _ = _archive(linked, link, leave_out="cifar-10-batches-py/test_batch")
    _serve(monkeypatch, url, md5)
    with pytest.raises(FileNotFoundError, match="test_batch is not a regular file"):
        load_cifar10(tmp_path / "data2", "test", download=True)
    assert list((tmp_path / "data2").iterdir()) == []


def test_download_leaves_an_incomplete_folder_alone(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    url, md5, _ = _archive(tmp_path)
    _serve(monkeypatch, url, md5)
    mine = tmp_path / "data" / "cifar-10-batches-py"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(FileNotFoundError, match="is incomplete; remove it to download again"):
        load_cifar10(tmp_path / "data", download=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


@pytest.mark.skipif(not SHARED.is_dir(), reason="the project's shared CIFAR-10 copy is absent")
def test_shared_copy_matches_published_hash_and_bundled_subset() -> None:
    x, y = load_cifar10(SHARED, "test")
    nhwc = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
    expected = "f9b1e2130bab680db56eb06d886f7f1ad0f1183907ceff4659d1735c890f5b04"
    assert hashlib.sha256(nhwc.tobytes()).hexdigest() == expected
    assert torch.bincount(y).tolist() == [1000] * 10
    bx, by = load_bundled("cifar10", "test")
    assert torch.equal(bx, x[: len(bx)]) and torch.equal(by, y[: len(by)])


class _TamperedDtype:
    """A uint8-sized void dtype whose pickled state declares an object field but no object flag."""

    def __reduce__(self):
        state = (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0)
        return (np.dtype, ("V8", False, True), state)


class _PointerScalar:
    """A scalar of that dtype: its 8 bytes would be read as a PyObject pointer."""

    def __reduce__(self):
        return (np.float64(0).__reduce__()[0], (_TamperedDtype(), b"\x41" * 8))


class _Deref:
    """np.dtype("u1", align=scalar) takes the scalar's truth value, dereferencing the pointer."""

    def __reduce__(self):
        return (np.dtype, ("u1", _PointerScalar()))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_with_forged_object_dtype_is_refused_without_crashing(
    tmp_path: Path, protocol: int
) -> None:
    # Only allowed numpy globals, but a dtype whose BUILD state hides an object field turns
    # file bytes into object pointers: the reader must refuse it, not crash the interpreter.
    bad = tmp_path / "data_batch_1"
    bad.write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0],
                                  "x": _Deref()}, protocol=protocol))
    code = (
        "import sys\n"
        "from discretelik.data.cifar10 import UnsafePickleError, read_cifar10_pickle\n"
        "try:\n"
        "    read_cifar10_pickle(sys.argv[1])\n"
        "except UnsafePickleError as exc:\n"
        "    print('refused:', exc)\n"
        "    sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "refused:" in proc.stdout and str(bad) in proc.stdout


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_pickled_numpy_labels_and_arrays_still_load(tmp_path: Path, protocol: int) -> None:
    x = _images(3, 7)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": _planar(x), "labels": np.arange(3, dtype=np.int64),
                                   "first": np.int64(2)}, protocol=protocol))
    images, labels = read_cifar10_pickle(path)
    assert torch.equal(images, _nchw(x)) and labels.tolist() == [0, 1, 2]


def test_python2_cpickle_bytes_load(tmp_path: Path) -> None:
    # The exact opcodes Python 2's cPickle wrote for the official batches: str (not bytes)
    # arguments and raw data, numpy.dtype('u1', 0, 1) with its BUILD state, and a
    # numpy.core.multiarray._reconstruct array (the dtype checks must keep this working).
    import struct

    raw = (np.arange(2 * 3072) % 251).astype(np.uint8).tobytes()

    def sbs(s: bytes) -> bytes:
        return b"U" + bytes([len(s)]) + s

    def binint(i: int) -> bytes:
        return b"J" + struct.pack("<i", i)

    p = b"\x80\x02}(" + sbs(b"data")
    p += b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85"
    p += sbs(b"b") + b"\x87R"
    p += b"(K\x01K\x02M\x00\x0c\x86" + b"cnumpy\ndtype\n" + sbs(b"u1") + b"K\x00K\x01\x87R"
    p += b"(K\x03" + sbs(b"|") + b"NNN" + binint(-1) + binint(-1) + b"K\x00tb"
    p += b"\x89" + b"T" + struct.pack("<i", len(raw)) + raw + b"tb"
    p += sbs(b"labels") + b"](K\x03K\x09e" + b"u."
    path = tmp_path / "data_batch_1"
    path.write_bytes(p)
    images, labels = read_cifar10_pickle(path)
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [3, 9]
    assert images.flatten().numpy().tobytes() == raw
