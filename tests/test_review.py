"""The FiftyOne review dataset against the shards it mirrors, syncing, near-duplicates, rejects."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from typer.testing import CliRunner

from subjectpairs.cli import app
from subjectpairs.corpus.reader import read_shard
from subjectpairs.curation.review import (
    MEMBERS,
    METRICS,
    ReviewConfig,
    build_review,
    fiftyone,
    rejected_keys,
)

pytestmark = pytest.mark.timeout(600)


def shard_samples(folder: Path) -> dict[str, dict]:
    manifest = json.loads((folder / "manifest.json").read_text())
    samples = [s for shard in manifest["shards"] for s in read_shard(str(folder / shard["name"]))]
    return {json.loads(s["json"])["key"]: {**s, "__key__": json.loads(s["json"])["key"]} for s in samples}


@pytest.fixture(scope="module")
def reviewed(demo_shards, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    report = build_review(ReviewConfig(shards=str(demo_shards), name="review-test", media_dir=str(media)),
                          overwrite=True, progress=False)
    return report, fiftyone().load_dataset("review-test"), media


def test_one_group_per_pair_with_both_slices_and_the_pair_fields(demo_shards, reviewed):
    report, dataset, media = reviewed
    samples = shard_samples(demo_shards)
    assert report.pairs == report.added == len(samples) and not report.failed_shards
    assert sorted(dataset.group_slices) == ["input", "target"] and dataset.default_group_slice == "target"
    assert dataset.mask_targets["trimap"] == {128: "unknown", 255: "foreground"}
    for slice_name, member in (("input", "input.jpg"), ("target", "target.jpg")):
        view = dataset.select_group_slices(slice_name)
        assert sorted(view.values("key")) == sorted(samples)  # one per key, none missing, none twice
        for sample in view:
            assert Path(sample.filepath).read_bytes() == samples[sample.key][member]
            meta = json.loads(samples[sample.key]["json"])
            assert sample.category == meta["category"] and sample.caption == meta["captions"][0]
            assert sample.shard.startswith("pairs-")
            for metric in METRICS:
                expected = meta["metrics"][metric]
                assert sample[metric] == pytest.approx(expected) if expected is not None else sample[metric] is None
    for target in dataset.select_group_slices("target"):
        meta = json.loads(samples[target.key]["json"])
        xmin, xmax, ymin, ymax = meta["box"]
        (detection,) = target.box.detections
        assert detection.label == meta["category"]
        assert detection.bounding_box == pytest.approx([xmin, ymin, xmax - xmin, ymax - ymin])
        assert Path(target.alpha.map_path).read_bytes() == samples[target.key]["alpha.png"]
        assert Path(target.trimap.mask_path).read_bytes() == samples[target.key]["trimap.png"]


def test_saved_views_hold_the_suspects_worst_first(reviewed):
    _, dataset, _ = reviewed
    assert {"low-alpha-coverage", "alpha-outside-box", "large-unknown-band", "small-subjects",
            "huge-subjects"} <= set(dataset.list_saved_views())
    low = dataset.load_saved_view("low-alpha-coverage").select_group_slices("target")
    values = low.values("alpha_in_box")
    assert values == sorted(values) and all(v < 0.5 for v in values)
    everything = dataset.select_group_slices("target").values("alpha_in_box")
    assert len(values) == sum(v is not None and v < 0.5 for v in everything)


def test_rebuilding_keeps_reviewers_tags_and_rewrites_nothing(demo_shards, reviewed):
    report, dataset, media = reviewed
    first = dataset.select_group_slices("input").first()
    first.tags.append("reject")
    first.save()
    files = {p: p.stat().st_mtime_ns for p in media.rglob("*") if p.is_file()}
    again = build_review(ReviewConfig(shards=str(demo_shards), name="review-test", media_dir=str(media)),
                         progress=False)
    assert (again.pairs, again.added, again.removed, again.updated) == (report.pairs, 0, 0, report.pairs)
    assert {p: p.stat().st_mtime_ns for p in media.rglob("*") if p.is_file()} == files
    assert rejected_keys("review-test") == [first.key]
    result = CliRunner().invoke(app, ["review", "rejects", "--name", "review-test", "--out", str(media / "rejects.txt")])
    assert result.exit_code == 0, result.output
    assert (media / "rejects.txt").read_text() == f"{first.key}\n"
    first.tags.remove("reject")
    first.save()


def test_a_sample_then_the_whole_corpus_syncs_both_ways(demo_shards, tmp_path):
    config = ReviewConfig(shards=str(demo_shards), name="review-sync", media_dir=str(tmp_path), sample=5)
    sampled = build_review(config, overwrite=True, progress=False)
    total = len(shard_samples(demo_shards))
    assert sampled.pairs == 5
    full = build_review(config.model_copy(update={"sample": None}), progress=False)
    assert (full.pairs, full.added, full.updated) == (total, total - 5, 5)
    back = build_review(config.model_copy(update={"sample": 3}), progress=False)
    assert (back.pairs, back.removed) == (3, total - 3)
    assert len(fiftyone().load_dataset("review-sync").select_group_slices("input")) == 3


def test_a_broken_shard_is_reported_and_the_rest_load(demo_shards, tmp_path):
    """A second shard, truncated: reported by name, nothing of it loaded, every pair of the first loaded;
    once readable again, a sync adds it."""
    folder = tmp_path / "shards"
    shutil.copytree(demo_shards, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    good = manifest["shards"][0]
    whole = (folder / good["name"]).read_bytes()
    victim = folder / "pairs-000099.tar"
    with wds.TarWriter(str(victim), encoder=False) as writer:
        for key, sample in shard_samples(demo_shards).items():
            renamed = "e" + key[1:]
            meta = {**json.loads(sample["json"]), "key": renamed}
            writer.write({**sample, "__key__": renamed, "json": json.dumps(meta).encode()})
    intact = victim.read_bytes()
    victim.write_bytes(intact[: len(intact) // 2])
    manifest["shards"] = [good, {**good, "name": victim.name}]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    command = ["review", "build", "--shards", str(folder), "--name", "review-broken",
               "--media-dir", str(tmp_path / "media")]
    result = CliRunner().invoke(app, [*command, "--overwrite"])
    assert result.exit_code == 1 and victim.name in result.output
    dataset = fiftyone().load_dataset("review-broken")
    assert sorted(dataset.select_group_slices("target").values("key")) == sorted(shard_samples(demo_shards))
    assert len(whole) and good["samples"] == len(shard_samples(demo_shards))
    victim.write_bytes(intact)
    assert CliRunner().invoke(app, command).exit_code == 0
    assert len(dataset.select_group_slices("target")) == 2 * good["samples"]


def test_near_duplicates_are_marked_and_saved_as_a_view(demo_shards, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model = tmp_path / "clip"
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=2, image_size=32, patch_size=8,
                                                   projection_dim=16)).save_pretrained(model)
    samples = list(shard_samples(demo_shards).values())
    original = samples[0]
    copy = {**original, "__key__": "ffffffffffffffff_copy"}
    copy["json"] = json.dumps({**json.loads(original["json"]), "key": copy["__key__"]}).encode()
    folder = tmp_path / "with-copy"
    folder.mkdir()
    with wds.TarWriter(str(folder / "pairs-000000.tar"), encoder=False) as writer:
        for sample in sorted(samples + [copy], key=lambda s: s["__key__"]):
            writer.write(sample)
    (folder / "manifest.json").write_text(json.dumps({"shards": [{"name": "pairs-000000.tar",
                                                                  "samples": len(samples) + 1}]}))
    build_review(ReviewConfig(shards=str(folder), name="review-dups", media_dir=str(tmp_path / "media"),
                              embeddings_model=str(model), duplicate_distance=0.01), overwrite=True, progress=False)
    dataset = fiftyone().load_dataset("review-dups")
    target = dataset.select_group_slices("target")
    partner = dict(zip(target.values("key"), target.values("near_duplicate_of")))
    assert partner[copy["__key__"]] == original["__key__"] and partner[original["__key__"]] == copy["__key__"]
    view = dataset.load_saved_view("near-duplicates").select_group_slices("target")
    assert {copy["__key__"], original["__key__"]} <= set(view.values("key"))


def _image(fmt: str, mode: str = "RGB") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (8, 8), 128).save(buffer, format=fmt)
    return buffer.getvalue()


def pair_members(name: str, **meta) -> dict[str, bytes]:
    """The members of one small pair named ``name`` (``meta`` overrides fields of its json)."""
    fields = {"key": name, "category": "Cat", "box": [0.1, 0.9, 0.2, 0.8], "captions": [f"a cat {name}"],
              "metrics": dict.fromkeys(METRICS, 0.5), **meta}
    return {"input.jpg": _image("JPEG"), "target.jpg": _image("JPEG"), "alpha.png": _image("PNG", "L"),
            "trimap.png": _image("PNG", "L"), "json": json.dumps(fields).encode()}


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A shard whose member names are ``<key>.<member>`` exactly as given (tarfile, not webdataset)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for member, data in sorted(members.items()):
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_media_paths_come_from_valid_member_keys_and_every_other_sample_is_a_named_rejection(tmp_path):
    good = ["k0", "k9"]
    no_trimap = {m: d for m, d in pair_members("k6").items() if m != "trimap.png"}
    absolute = str(tmp_path / "outside" / "x")  # a member key naming an absolute path (kept under tmp_path)
    write_tar(tmp_path / "shards" / "pairs-000000.tar", [
        ("k0", pair_members("k0")),
        ("k2", pair_members("k2", key="../../escape")),
        ("k3", pair_members("k3", key=str(tmp_path / "absolute"))),
        ("../../up", pair_members("../../up")),
        (absolute, pair_members(absolute)),
        ("a.b", pair_members("a.b")),
        ("k4", {**pair_members("k4"), "json": b'{"key": "k4", '}),
        ("k5", {**pair_members("k5"), "json": json.dumps({"key": "k5", "category": "Cat"}).encode()}),
        ("k6", no_trimap),
        ("k9", pair_members("k9")),
    ])
    media = tmp_path / "work" / "media"
    config = ReviewConfig(shards=str(tmp_path / "shards"), name="review-keys", media_dir=str(media))
    report = build_review(config, overwrite=True, progress=False)
    assert {r.shard for r in report.rejected} == {"pairs-000000.tar"}
    assert {(r.key, r.reason) for r in report.rejected} == {
        ("k2", "key_mismatch"), ("k3", "key_mismatch"), ("../../up", "invalid_key"), (absolute, "invalid_key"),
        ("a.b", "invalid_key"), ("k4", "bad_json"), ("k5", "bad_fields"), ("k6", "missing_member")}
    assert "box" in next(r.detail for r in report.rejected if r.key == "k5")
    assert report.pairs == 2 and not report.failed_shards
    dataset = fiftyone().load_dataset("review-keys")
    assert sorted(dataset.select_group_slices("target").values("key")) == good
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert written == sorted([Path("shards/pairs-000000.tar"), *(
        Path("work/media/pairs-000000") / f"{key}.{member}" for key in good for member in MEMBERS[:-1])])
    result = CliRunner().invoke(app, ["review", "build", "--shards", str(tmp_path / "shards"), "--name",
                                      "review-keys", "--media-dir", str(media)])
    assert result.exit_code == 1, result.output
    for key, reason in (("'../../up'", "invalid_key"), ("'k4'", "bad_json"), ("'a.b'", "invalid_key")):
        assert f"pairs-000000.tar {key}: {reason}" in result.stderr
    assert "8 sample(s) not in the review dataset" in result.stderr


def test_media_paths_are_absolute_and_an_exporter_elsewhere_finds_every_file(tmp_path, monkeypatch):
    fo = fiftyone()
    write_tar(tmp_path / "shards" / "pairs-000000.tar", [(key, pair_members(key)) for key in ("k0", "k1")])
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    build_review(ReviewConfig(shards=str(tmp_path / "shards"), name="review-abs", media_dir="media"),
                 overwrite=True, progress=False)
    monkeypatch.chdir(tmp_path / "elsewhere")
    dataset = fo.load_dataset("review-abs")
    targets = dataset.select_group_slices("target")
    paths = [*dataset.select_group_slices().values("filepath"), *targets.values("alpha.map_path"),
             *targets.values("trimap.mask_path")]
    assert len(paths) == 8 and all(Path(p).is_absolute() and Path(p).is_file() for p in paths)
    assert dataset.info["subjectpairs"]["media_dir"] == str(tmp_path / "here" / "media")
    dataset.export(export_dir="export", dataset_type=fo.types.FiftyOneDataset, export_media=True)
    exported = {p.name for p in (tmp_path / "elsewhere" / "export").rglob("*") if p.is_file()}
    assert {Path(p).name for p in paths} <= exported


@pytest.mark.parametrize("where", ["same", "inside", "holding"])
def test_a_media_dir_overlapping_the_shards_is_refused_before_anything_changes(tmp_path, where):
    shards = tmp_path / "corpus" / "shards"
    write_tar(shards / "pairs-000000.tar", [("k0", pair_members("k0"))])
    media = {"same": shards, "inside": shards / "media", "holding": tmp_path / "corpus"}[where]
    before = sorted(tmp_path.rglob("*"))
    result = CliRunner().invoke(app, ["review", "build", "--shards", str(shards), "--name", f"review-{where}",
                                      "--media-dir", str(media)])
    assert result.exit_code == 2 and "--media-dir" in result.stderr and "--shards" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(tmp_path.rglob("*")) == before and not fiftyone().dataset_exists(f"review-{where}")


@pytest.mark.parametrize("address, warned", [("0.0.0.0", True), ("[::]", True), ("192.168.1.7", True),
                                             ("review.example.org", True), ("127.0.0.1", False),
                                             ("localhost", False), ("::1", False), ("127.0.1.1", False)])
def test_serving_the_app_beyond_loopback_warns_loudly(monkeypatch, address, warned):
    from subjectpairs.curation import review

    served = []

    class Session:
        def wait(self, timeout):
            served.append(timeout)

    monkeypatch.setattr(review, "launch_app", lambda name, port, address: Session())
    result = CliRunner().invoke(app, ["review", "app", "--name", "any", "--address", address])
    assert result.exit_code == 0 and served == [-1], result.output
    if warned:
        assert result.stderr.startswith("WARNING: the FiftyOne App has no authentication")
        assert f"on {address} anyone" in result.stderr and "ssh -L" in result.stderr
    else:
        assert result.stderr == ""
