"""The build configuration's hash: what makes an output folder "another configuration"."""

from __future__ import annotations

from subjectpairs.pipelines.config import BuildConfig

# The hash of the default configuration from before the fetch deadline, byte cap and redirect cap existed:
# output folders built then must still count as the same configuration (or a rerun would refuse them).
DEFAULT_HASH = "a9d877027359d80d6cad0dcf5adb84370d972b66d4475944cdc178b63c707b9e"
UNGATED = {"quality": {"enabled": False}}  # those builds had no quality gate


def _config(**fetch) -> BuildConfig:
    return BuildConfig.model_validate({"out": "x", "candidates": "c.parquet", "fetch": fetch, "pair": UNGATED})


def test_keys_added_later_keep_the_hash_of_older_builds_at_their_defaults():
    assert _config().config_hash() == DEFAULT_HASH
    # the quality gate makes other shards: with it (the default) a build is another configuration
    assert BuildConfig(out="x", candidates="c.parquet").config_hash() != DEFAULT_HASH


def test_keys_added_later_count_once_they_are_set():
    assert _config(max_bytes=1_000_000).config_hash() != DEFAULT_HASH
    assert _config(deadline=5.0).config_hash() != DEFAULT_HASH
    assert _config(max_redirects=2).config_hash() != DEFAULT_HASH
    # and where the build runs stays out of it
    assert BuildConfig.model_validate({"out": "elsewhere", "candidates": "c.parquet", "max_tasks": 3,
                                       "pair": UNGATED}).config_hash() == DEFAULT_HASH


def test_captioner_settings_count_only_with_a_captioner():
    def config(captioner: dict) -> BuildConfig:
        return BuildConfig.model_validate({"out": "x", "candidates": "c.parquet", "captioner": captioner,
                                           "pair": UNGATED})

    assert config({"samples": 3, "ranker": None}).config_hash() == DEFAULT_HASH
    captioned = config({"model": "Salesforce/blip2-opt-6.7b"}).config_hash()
    assert captioned != DEFAULT_HASH
    assert config({"model": "Salesforce/blip2-opt-6.7b", "ranker": None}).config_hash() != captioned
    assert config({"model": "Salesforce/blip2-opt-6.7b", "label_match": "all"}).config_hash() != captioned


def test_require_clipseg_stays_out_of_the_hash():
    # it decides whether a build may run, not what it makes: a build that passes makes the same shards
    required = BuildConfig.model_validate({"out": "x", "candidates": "c.parquet",
                                           "pair": {**UNGATED, "segmenter": {"require_clipseg": True}}})
    assert required.config_hash() == DEFAULT_HASH
