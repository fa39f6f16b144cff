"""DreamBench's official layout read by ``training.dreambench``: the real prompt and class list and photos,
and malformed copies of them written in tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from subjectpairs.errors import InputError
from subjectpairs.training.dreambench import (
    LIVE_CLASSES, PROMPTS_FILE, BenchSubject, DreamBench, fill_prompt, read_dreambench,
)

DREAMBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dreambench"
PRESENT = ["backpack", "candle", "cat", "dog", "duck_toy", "teapot"]


@pytest.fixture(scope="module")
def bench() -> DreamBench:
    if not (DREAMBENCH / PROMPTS_FILE).exists():
        pytest.skip(f"no DreamBench copy at {DREAMBENCH}")
    return read_dreambench(DREAMBENCH)


@pytest.fixture(scope="module")
def official_text() -> str:
    if not (DREAMBENCH / PROMPTS_FILE).exists():
        pytest.skip(f"no DreamBench copy at {DREAMBENCH}")
    return (DREAMBENCH / PROMPTS_FILE).read_text(encoding="utf-8")


def write_bench(root: Path, text: str, photos: dict[str, list[str]] | None = None) -> Path:
    """A DreamBench folder with ``text`` as its prompt and class list and empty-but-named photo files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / PROMPTS_FILE).write_text(text, encoding="utf-8")
    for subject, names in (photos or {}).items():
        (root / subject).mkdir(exist_ok=True)
        for name in names:
            (root / subject / name).write_bytes(b"")
    return root


SMALL = """Classes

subject_name,class
backpack,backpack
dog,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a {0} {1} wearing a santa hat'.format(unique_token, class_token)
]
"""


# -- the real file --------------------------------------------------------------------------------------

def test_the_official_list_has_its_thirty_subjects_with_their_classes(bench):
    assert len(bench.classes) == 30
    assert bench.classes["bear_plushie"] == "stuffed animal"
    assert bench.classes["dog6"] == "dog"
    assert bench.classes["pink_sunglasses"] == "glasses"
    assert bench.classes["duck_toy"] == "toy"
    assert list(bench.classes)[0] == "backpack" and list(bench.classes)[-1] == "wolf_plushie"
    assert "subject_name" not in bench.classes  # the header line is not a subject


def test_the_official_list_has_25_object_and_25_live_templates(bench):
    assert len(bench.object_templates) == 25
    assert len(bench.live_templates) == 25
    assert bench.object_templates[0] == "a {0} {1} in the jungle"
    assert bench.live_templates[11] == "a {0} {1} wearing a santa hat"
    assert "a {0} {1} wearing a santa hat" not in bench.object_templates
    assert "a {0} {1} floating on top of water" not in bench.live_templates
    assert bench.root == DREAMBENCH


def test_present_lists_the_six_subjects_with_photos_in_the_files_order(bench):
    assert bench.present() == PRESENT
    assert [subject.name for subject in bench.subjects()] == PRESENT


def test_a_dog_takes_the_live_prompts_with_the_unique_token_dropped(bench):
    dog = bench.subject("dog")
    prompts = bench.prompts(dog)
    assert len(prompts) == 25
    assert prompts[0] == "a dog in the jungle"
    assert "a dog wearing a santa hat" in prompts
    assert prompts[-1] == "a cube shaped dog"
    assert not any("  " in p or "{" in p or "}" in p or p != p.strip() for p in prompts)
    assert "a dog floating on top of water" not in prompts  # an object prompt


def test_a_teapot_takes_the_object_prompts(bench):
    teapot = bench.subject("teapot")
    prompts = bench.prompts(teapot)
    assert len(prompts) == 25
    assert "a teapot floating on top of water" in prompts
    assert prompts[-1] == "a cube shaped teapot"
    assert "a teapot wearing a santa hat" not in prompts
    assert not any("  " in p or "{" in p for p in prompts)


def test_a_stuffed_animal_keeps_its_two_word_class_in_the_prompt(bench):
    plushie = BenchSubject("bear_plushie", bench.classes["bear_plushie"], ())
    assert bench.prompts(plushie)[0] == "a stuffed animal in the jungle"


def test_a_subject_has_its_photos_sorted_by_name(bench):
    dog = bench.subject("dog")
    assert dog.category == "dog"
    assert [p.name for p in dog.photos] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg", "04.jpg"]
    assert all(p.parent == DREAMBENCH / "dog" for p in dog.photos)
    assert [p.name for p in bench.subject("duck_toy").photos] == ["00.jpg", "01.jpg", "02.jpg", "03.jpg"]


def test_cats_and_dogs_are_live_and_objects_are_not(bench):
    assert bench.subject("cat").live
    assert bench.subject("dog").live
    assert not bench.subject("backpack").live
    assert not bench.subject("teapot").live
    assert LIVE_CLASSES == {"dog", "cat"}
    live = sorted(name for name, category in bench.classes.items() if category in LIVE_CLASSES)
    assert len(live) == 9  # DreamBooth's 9 live subjects of 30


def test_fill_prompt_drops_the_unique_token_and_fills_the_class():
    assert fill_prompt("a {0} {1} in the snow", "dog") == "a dog in the snow"
    assert fill_prompt("a red {0} {1}", "teapot") == "a red teapot"
    assert fill_prompt("a {0} {1}", "stuffed animal") == "a stuffed animal"


# -- hostile and malformed input ------------------------------------------------------------------------

def test_a_missing_prompt_file_is_an_input_error_naming_it(tmp_path):
    with pytest.raises(InputError, match="cannot read the DreamBench prompt and class list") as raised:
        read_dreambench(tmp_path)
    assert PROMPTS_FILE in str(raised.value)


def test_a_file_that_is_not_utf8_is_an_input_error(tmp_path):
    (tmp_path / PROMPTS_FILE).write_bytes(b"Classes\n\xff\xfe\x00broken")
    with pytest.raises(InputError, match="cannot read"):
        read_dreambench(tmp_path)


def test_a_file_without_the_live_prompt_section_is_an_input_error(tmp_path, official_text):
    cut = official_text[: official_text.index("Live Subject Prompts")]
    write_bench(tmp_path, cut)
    with pytest.raises(InputError, match="no 'Live Subject Prompts' section"):
        read_dreambench(tmp_path)


def test_a_file_of_something_else_names_every_missing_section(tmp_path):
    write_bench(tmp_path, "just some notes\nnot a benchmark\n")
    with pytest.raises(InputError, match="not DreamBench's prompt and class list") as raised:
        read_dreambench(tmp_path)
    for section in ("'Classes'", "'Object Prompts'", "'Live Subject Prompts'"):
        assert section in str(raised.value)


@pytest.mark.parametrize("original, damaged, message", [
    ("dog,dog", "dog dog", r"class line 'dog dog' is not 'subject_name,class'"),  # no comma
    ("dog,dog", "dog,", "class line 'dog,'"),  # an empty class
    ("'a {0} {1} in the jungle'.format(unique_token, class_token),\n'a red {0} {1}'.format(unique_token, class_token)",
     "", "the 'Object Prompts' list has no prompts"),  # a list without templates
    ("'a red {0} {1}'", "'a red {0}'", "the 'Object Prompts' list"),  # a template without the class slot
    ("dog,dog", "../../outside,dog", "subject name '../../outside' is not"),  # would climb out of --out
    ("dog,dog", "/etc,dog", "subject name '/etc' is not"),
], ids=["class-line-without-comma", "empty-class", "list-without-templates", "template-without-class-slot",
        "subject-name-climbing-out", "absolute-subject-name"])
def test_a_malformed_line_is_an_input_error_naming_it(tmp_path, original, damaged, message):
    assert original in SMALL
    write_bench(tmp_path, SMALL.replace(original, damaged))
    with pytest.raises(InputError, match=message):
        read_dreambench(tmp_path)


def test_an_empty_class_table_is_an_input_error(tmp_path):
    write_bench(tmp_path, SMALL.replace("backpack,backpack\ndog,dog\n", ""))
    with pytest.raises(InputError, match="no subject_name,class lines"):
        read_dreambench(tmp_path)


def test_an_unknown_subject_is_an_input_error_naming_it(tmp_path):
    bench = read_dreambench(write_bench(tmp_path, SMALL, {"dog": ["00.jpg"]}))
    with pytest.raises(InputError, match="no subject 'unicorn' in prompts_and_classes.txt"):
        bench.subject("unicorn")
    with pytest.raises(InputError, match="no subject 'unicorn'"):
        bench.subjects(["dog", "unicorn"])


def test_a_listed_subject_without_a_folder_is_an_input_error(tmp_path):
    bench = read_dreambench(write_bench(tmp_path, SMALL, {"dog": ["00.jpg"]}))
    assert "backpack" in bench.classes and bench.present() == ["dog"]
    with pytest.raises(InputError, match="no photos of subject 'backpack'"):
        bench.subject("backpack")
    with pytest.raises(InputError, match="no photos of subject 'backpack'"):
        bench.subjects(["dog", "backpack"])


def test_a_subject_of_the_official_list_without_photos_here_is_an_input_error(bench):
    assert "dog2" in bench.classes and not (DREAMBENCH / "dog2").exists()
    with pytest.raises(InputError, match="no photos of subject 'dog2'"):
        bench.subject("dog2")


def test_a_subject_folder_without_photos_is_an_input_error(tmp_path):
    bench = read_dreambench(write_bench(tmp_path, SMALL, {"dog": ["notes.txt"]}))
    assert bench.present() == []
    with pytest.raises(InputError, match="no photos of subject 'dog'"):
        bench.subject("dog")
    with pytest.raises(InputError, match="none of the 2 subjects"):
        bench.subjects()


def test_a_subject_folder_ignores_files_that_are_not_photos(tmp_path):
    root = write_bench(tmp_path, SMALL, {"dog": ["01.JPG", "00.jpg", "notes.txt", "02.png", ".DS_Store"],
                                         "backpack": ["00.webp"]})
    (root / "dog" / "03.jpg").mkdir()  # a folder named like a photo is not one
    bench = read_dreambench(root)
    assert [p.name for p in bench.subject("dog").photos] == ["00.jpg", "01.JPG", "02.png"]
    assert bench.present() == ["backpack", "dog"]
    assert bench.prompts(bench.subject("dog")) == ["a dog in the jungle", "a dog wearing a santa hat"]
    assert bench.prompts(bench.subject("backpack")) == ["a backpack in the jungle", "a red backpack"]


def test_a_copy_of_the_real_layout_reads_the_same(tmp_path, bench):
    shutil.copy(DREAMBENCH / PROMPTS_FILE, tmp_path / PROMPTS_FILE)
    shutil.copytree(DREAMBENCH / "cat", tmp_path / "cat")
    (tmp_path / "cat" / "notes.txt").write_text("where the photos came from")
    copy = read_dreambench(tmp_path)
    assert copy.classes == bench.classes
    assert copy.present() == ["cat"]
    assert [p.name for p in copy.subject("cat").photos] == [p.name for p in bench.subject("cat").photos]
