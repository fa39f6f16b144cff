import pytest

from subjectpairs.curation.classes import bundled_class_list, parse_class_list, read_class_list
from subjectpairs.curation.config import CLUTTERED_CLASSES, HUMAN_CLASSES
from subjectpairs.errors import InputError


def test_official_list_has_601_classes_and_matches_the_bundled_copy(class_list):
    assert len(class_list) == 601
    bundled = bundled_class_list()
    assert bundled.mids == class_list.mids and bundled.names == class_list.names


def test_every_paper_exclusion_resolves_to_exactly_one_mid(class_list):
    resolved = class_list.mids_for_names(list(HUMAN_CLASSES + CLUTTERED_CLASSES))
    assert len(resolved) == 27
    assert class_list.mids_for_names(["Person"]) == {"/m/01g317": "Person"}


def test_names_match_exactly_but_case_insensitively(class_list):
    assert class_list.mids_for_names(["human FACE"]) == {"/m/0dzct": "human FACE"}
    for near_miss in ["Human", "Tree ", "Pers"]:
        with pytest.raises(InputError, match="not in the class file"):
            class_list.mids_for_names([near_miss])


def test_bad_class_files_name_the_line(tmp_path):
    with pytest.raises(InputError, match=r"line 2: expected 2 fields"):
        parse_class_list("/m/01,Cat\n/m/02,Dog,extra\n", "x.csv")
    with pytest.raises(InputError, match=r"line 1: 'cat' is not an OpenImages MID"):
        parse_class_list("cat,Cat\n", "x.csv")
    for unsafe in ("/m/../x", "/m/a b", "/m/a.b", "/m/" + "x" * 126):  # paths, spaces, dots, over 128
        with pytest.raises(InputError, match=r"line 2: .* is not an OpenImages MID"):
            parse_class_list(f"/m/01,Cat\n{unsafe},Dog\n", "x.csv")
    with pytest.raises(InputError, match=r"line 2: MID /m/01 repeats line 1"):
        parse_class_list("/m/01,Cat\n/m/01,Dog\n", "x.csv")
    with pytest.raises(InputError, match="file not found"):
        read_class_list(str(tmp_path / "absent.csv"))
