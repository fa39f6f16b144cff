"""storage's folder listings, file copies and filesystems, on local paths and on fsspec's in-memory store."""

from __future__ import annotations

import gzip
import uuid

import pyarrow.fs
import pytest

from subjectpairs import storage


@pytest.fixture
def memory_root():
    """A fresh folder in fsspec's in-memory filesystem (one store per process), removed afterwards."""
    root = f"memory://storage-test-{uuid.uuid4().hex}"
    yield root
    storage.remove(root)


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path, memory_root) -> str:
    return str(tmp_path / "root") if request.param == "local" else memory_root


def write(uri: str, data: bytes) -> None:
    storage.make_folder(uri.rsplit("/", 1)[0])
    storage.publish_bytes(uri, data)


def test_list_folder_names_what_is_directly_in_a_folder(root):
    write(storage.join(root, "b.tar"), b"b")
    write(storage.join(root, "a.json"), b"a")
    write(storage.join(root, ".hidden"), b"h")
    write(storage.join(root, "sub", "deep.tar"), b"d")
    assert storage.list_folder(root) == [".hidden", "a.json", "b.tar", "sub"]
    assert storage.list_folder(root + "/") == [".hidden", "a.json", "b.tar", "sub"]
    assert storage.list_folder(storage.join(root, "sub")) == ["deep.tar"]
    names = [f"n{i:02d}" for i in range(40)]
    for name in reversed(names):
        write(storage.join(root, "many", name), b"")
    assert storage.list_folder(storage.join(root, "many")) == names


def test_list_folder_of_a_missing_folder_or_a_file_is_empty(root):
    write(storage.join(root, "a.json"), b"a")
    assert storage.list_folder(storage.join(root, "missing")) == []
    assert storage.list_folder(storage.join(root, "a.json")) == []


def test_file_sizes_are_of_the_files_directly_in_a_folder(root):
    write(storage.join(root, "one"), b"x")
    write(storage.join(root, "three"), b"xyz")
    write(storage.join(root, "sub", "inner"), b"12345")
    assert storage.file_sizes(root) == {"one": 1, "three": 3}
    with pytest.raises(FileNotFoundError):
        storage.file_sizes(storage.join(root, "missing"))


def test_file_reader_reads_files_as_stored(tmp_path, memory_root):
    packed = gzip.compress(b"not unpacked")
    (tmp_path / "photo.gz").write_bytes(packed)
    local = storage.FileReader("file")
    assert local.read(str(tmp_path / "photo.gz")) == packed  # no decompression, unlike read_bytes
    assert local.read(f"file://{tmp_path}/photo.gz") == packed
    write(storage.join(memory_root, "photo.jpg"), b"photo bytes")
    assert storage.FileReader("memory").read(storage.join(memory_root, "photo.jpg")) == b"photo bytes"


def test_file_reader_raises_what_the_filesystem_raises(tmp_path, memory_root):
    with pytest.raises(FileNotFoundError):
        storage.FileReader("file").read(str(tmp_path / "missing.jpg"))
    with pytest.raises(FileNotFoundError):
        storage.FileReader("memory").read(storage.join(memory_root, "missing.jpg"))


def test_file_reader_makes_its_filesystem_once_with_the_options(monkeypatch, tmp_path):
    made = []
    real = storage.fsspec.filesystem

    def filesystem(protocol, **options):
        made.append((protocol, options))
        return real(protocol, **options)

    monkeypatch.setattr(storage.fsspec, "filesystem", filesystem)
    (tmp_path / "a").write_bytes(b"a")
    reader = storage.FileReader("file", auto_mkdir=True)
    assert reader.read(str(tmp_path / "a")) == b"a" and reader.read(str(tmp_path / "a")) == b"a"
    assert made == [("file", {"auto_mkdir": True})]


def test_publish_file_copies_a_local_file_to_a_path_or_uri_whole(tmp_path, root, monkeypatch):
    synced = []
    real_fsync = storage.os.fsync
    monkeypatch.setattr(storage.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    source = tmp_path / "shard.tar"
    source.write_bytes(b"0123456789" * 100_000)  # more than one block
    storage.make_folder(root)
    target = storage.join(root, "shard.tar")
    storage.publish_file(str(source), target)
    assert storage.read_bytes(target) == source.read_bytes()
    source.write_bytes(b"shorter")
    storage.publish_file(source, target)  # replaces the whole file
    assert storage.read_bytes(target) == b"shorter"
    assert len(synced) == (0 if storage.is_remote(root) else 2)  # a local copy is on disk when it returns
    assert storage.list_folder(root) == ["shard.tar"]  # no staged copy left beside it


def test_download_folder_copies_a_tree_into_a_local_folder(tmp_path, root):
    write(storage.join(root, "checkpoint", "model.bin"), b"weights")
    write(storage.join(root, "checkpoint", "sub", "state.json"), b"{}")
    target = tmp_path / "copy"
    storage.download_folder(storage.join(root, "checkpoint"), str(target))
    assert (target / "model.bin").read_bytes() == b"weights"
    assert (target / "sub" / "state.json").read_bytes() == b"{}"
    # into a folder that is there already: the files land directly in it, replacing those of the same names
    write(storage.join(root, "checkpoint", "model.bin"), b"newer")
    storage.download_folder(storage.join(root, "checkpoint") + "/", target)
    assert (target / "model.bin").read_bytes() == b"newer"
    assert sorted(p.name for p in target.iterdir()) == ["model.bin", "sub"]


def test_download_folder_of_a_missing_folder_raises(tmp_path, root):
    with pytest.raises(FileNotFoundError):
        storage.download_folder(storage.join(root, "missing"), str(tmp_path / "copy"))


def test_arrow_filesystem_reaches_the_same_files(tmp_path, memory_root):
    for root in (str(tmp_path / "run"), memory_root):
        write(storage.join(root, "written.txt"), b"by storage")
        filesystem, path = storage.arrow_filesystem(storage.join(root, "written.txt"))
        assert isinstance(filesystem, pyarrow.fs.FileSystem)
        with filesystem.open_input_stream(path) as stream:
            assert stream.read() == b"by storage"
        filesystem, path = storage.arrow_filesystem(root)
        with filesystem.open_output_stream(f"{path.rstrip('/')}/by-arrow.txt") as stream:
            stream.write(b"by arrow")
        assert storage.read_bytes(storage.join(root, "by-arrow.txt")) == b"by arrow"
    assert storage.arrow_filesystem(str(tmp_path / "run"))[1] == str(tmp_path / "run")
