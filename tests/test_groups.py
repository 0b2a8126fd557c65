import dataclasses
import json
import time
import tracemalloc

import numpy as np
import pytest
import torch

import mosx
from mosx import Groups
from mosx.groups import GroupRequest
from mosx.train.grouping import resolve_groups


def test_from_sizes_layout():
    g = Groups.from_sizes([2, 1, 3])
    assert (g.num_groups, g.num_classes, g.num_logits) == (3, 6, 9)
    assert g.offsets.tolist() == [0, 3, 5, 9]
    assert g.slices.tolist() == [[0, 3], [3, 5], [5, 9]]
    # classes numbered group by group, others slot first in every slice
    assert g.class_logit.tolist() == [1, 2, 4, 6, 7, 8]
    assert g.logit_class.tolist() == [-1, 0, 1, -1, 2, -1, 3, 4, 5]
    assert g.class_to_group == (0, 0, 1, 2, 2, 2)
    assert g.class_within == (0, 1, 0, 0, 1, 2)


def test_imagenet_taxonomy():
    g = Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
    assert (g.num_classes, g.num_groups, g.num_logits) == (1000, 8, 1008)


def test_from_assignment_ranks_within_group():
    g = Groups.from_assignment([1, 0, 1, 0, 2])
    assert g.sizes == (2, 2, 1)
    # group 0 holds classes 1 and 3 in that order, group 1 holds 0 and 2
    assert g.class_within == (0, 0, 1, 1, 0)
    assert g.class_logit.tolist() == [4, 1, 5, 2, 7]
    assert Groups.from_assignment(torch.tensor([1, 0, 1, 0, 2])) == g


def test_group_labels():
    g = Groups.from_assignment([1, 0, 1, 0, 2])
    lab = g.group_labels(torch.tensor([0, 3, 4, -100]))
    assert lab.tolist() == [[0, 1, 0], [2, 0, 0], [0, 0, 1], [-100, -100, -100]]
    with pytest.raises(ValueError, match="class id 5 out of range"):
        g.group_labels(torch.tensor([5]))


def test_slices_roundtrip_and_as_groups():
    g = Groups.from_sizes([4, 1, 2])
    assert Groups.from_slices(g.slices) == g
    assert Groups.from_offsets(g.offsets) == g
    assert mosx.as_groups([4, 1, 2]) == g
    assert mosx.as_groups(g.slices) == g
    assert mosx.as_groups(g.slices.tolist()) == g
    assert mosx.as_groups(g) is g


def test_save_load(tmp_path):
    g = Groups.from_assignment([2, 0, 1, 0, 2, 2])
    p = tmp_path / "groups.json"
    g.save(p)
    assert json.loads(p.read_text())["format"] == "mosx.groups/1"
    assert Groups.load(p) == g
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a mosx groups file"):
        Groups.load(tmp_path / "bad.json")


def test_from_list_file(tmp_path):
    p = tmp_path / "train.txt"
    p.write_text("a/1.jpg 0 0\na/2.jpg 0 1\nb/1.jpg 1 0\nc/1.jpg 2 2\nc/2.jpg 2 0\nc/3.jpg 2 1\n")
    assert Groups.from_list_file(p).sizes == (2, 1, 3)
    p.write_text("a/1.jpg 0 0\nb/1.jpg 0 2\n")
    with pytest.raises(ValueError, match="never occur"):
        Groups.from_list_file(p)
    p.write_text("a/1.jpg 0\n")
    with pytest.raises(ValueError, match="expected"):
        Groups.from_list_file(p)


@pytest.mark.parametrize(
    "bad, msg",
    [
        ([], "at least one group"),
        ([3, 0, 2], "needs >= 1 class"),
    ],
)
def test_bad_sizes(bad, msg):
    with pytest.raises(ValueError, match=msg):
        Groups.from_sizes(bad)


def test_bad_slices():
    with pytest.raises(ValueError, match="start at logit 0"):
        Groups.from_slices([[1, 3]])
    with pytest.raises(ValueError, match="contiguous"):
        Groups.from_slices([[0, 3], [4, 6]])
    with pytest.raises(ValueError, match="others slot"):
        Groups.from_slices([[0, 3], [3, 4]])


def test_bad_assignment():
    with pytest.raises(ValueError, match="no class"):
        Groups.from_assignment([0, 2], num_groups=3)
    with pytest.raises(ValueError, match=">= 0"):
        Groups.from_assignment([0, -1])


def test_tensors_cached_per_device():
    g = Groups.from_sizes([2, 3])
    assert g.tensors("cpu") is g.tensors(torch.device("cpu"))
    assert g.tensors("cpu")["offsets"].dtype == torch.int64


# ---------------------------------------------------------------------- Groups.parse: one reader for every command
SIZES = (2, 1, 3)


class FakeData:
    """What resolve_groups needs of a data set: 6 classes, no list-file grouping."""

    num_classes, class_names, list_groups, targets = 6, ["a", "b", "c", "d", "e", "f"], None, []


@pytest.fixture
def group_files(tmp_path):
    """The same grouping (sizes 2, 1, 3) in every file form."""
    g = Groups.from_sizes(SIZES)
    files = {
        "json": tmp_path / "groups.json",
        "json_txt": tmp_path / "groups.txt",
        "list": tmp_path / "train.txt",
        "list_noext": tmp_path / "trainlist",
        "npy": tmp_path / "taxonomy_level0.npy",
        "npy_noext": tmp_path / "sizes.bin",
    }
    g.save(files["json"])
    g.save(files["json_txt"])  # mosx train read any file as Groups JSON
    lines = "a/1.jpg 0 0\na/2.jpg 0 1\nb/1.jpg 1 0\nc/1.jpg 2 2\nc/2.jpg 2 0\nc/3.jpg 2 1\n"
    files["list"].write_text(lines)
    files["list_noext"].write_text(lines)
    np.save(files["npy"], np.array(SIZES, dtype=np.int64))
    with open(files["npy_noext"], "wb") as f:  # known by its magic bytes, whatever the name
        np.save(f, np.array(SIZES, dtype=np.int32))
    return g, files


def test_parse_forms_without_data(group_files):
    g, files = group_files
    assert Groups.parse(g) is g
    for spec in (
        [2, 1, 3],
        (2, 1, 3),
        torch.tensor([2, 1, 3]),
        np.array([2, 1, 3]),
        g.slices,
        g.slices.tolist(),
        "2,1,3",
        " 2, 1, 3, ",
        "sizes:2,1,3",
        "sizes:2,1,3,",
        *files.values(),
        *map(str, files.values()),
    ):
        got = Groups.parse(spec)
        assert got == g, spec
        assert Groups.parse(spec, need_data=False) == g, spec
    assert (
        Groups.parse(",".join(map(str, mosx.IMAGENET_TAXONOMY_SIZES)))
        == Groups.parse("sizes:" + ",".join(map(str, mosx.IMAGENET_TAXONOMY_SIZES)))
        == Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
    )
    # an assignment that is not group by group survives the JSON round trip
    h = Groups.from_assignment([2, 0, 1, 0, 2, 2])
    h.save(files["json"])
    assert Groups.parse(str(files["json"])) == h


def test_old_spellings_of_both_commands_give_the_same_groups(group_files):
    g, files = group_files
    # mosx train: sizes:..., a Groups JSON under any name, sizes lists and Groups objects
    for spec in ("sizes:2,1,3", str(files["json"]), str(files["json_txt"]), [2, 1, 3], g):
        assert resolve_groups(spec, FakeData) == g == Groups.parse(spec, need_data=False), spec
    # mosx eval: comma-separated sizes, a .json, a list file under any name
    for spec in ("2,1,3", str(files["json"]), str(files["list"]), str(files["list_noext"])):
        assert Groups.parse(spec, need_data=False) == g == resolve_groups(spec, FakeData), spec
    # the reference .npy works in both
    assert resolve_groups(str(files["npy"]), FakeData) == g == Groups.parse(str(files["npy"]), need_data=False)


def test_parse_requests_need_data(tmp_path):
    tax = str(tmp_path / "tax.txt")
    cases = {
        "kmeans:8": GroupRequest("kmeans", k=8),
        "random:3": GroupRequest("random", k=3),
        f"taxonomy:{tax}": GroupRequest("taxonomy", path=tax),
        "list": GroupRequest("list"),
    }
    for spec, want in cases.items():
        got = Groups.parse(spec)
        assert got == want and str(got) == spec
        with pytest.raises(ValueError, match=r"needs training data.*mosx eval takes"):
            Groups.parse(spec, need_data=False)
    with pytest.raises(ValueError, match="give that list file itself"):
        Groups.parse("list", need_data=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cases["list"].kind = "kmeans"  # frozen
    # resolve_groups builds them from the data
    r = resolve_groups("random:2", FakeData, seed=1)
    assert r.num_groups == 2 and r == resolve_groups(GroupRequest("random", k=2), FakeData, seed=1)
    with pytest.raises(ValueError, match="the group loss needs a grouping"):
        resolve_groups(None, FakeData)

    class ListData(FakeData):
        list_groups = Groups.from_sizes(SIZES)

    assert resolve_groups(None, ListData) is ListData.list_groups is resolve_groups("list", ListData)


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("kmeans:0", r"kmeans:K needs a whole number of groups K >= 1, got '0'"),
        ("kmeans:x", r"kmeans:K needs a whole number"),
        ("random:", r"random:K needs a whole number"),
        ("random:2.5", r"random:K needs a whole number"),
        ("taxonomy:", r"taxonomy:FILE needs a file"),
        ("sizes:", r"sizes must be comma-separated whole numbers"),
        ("sizes:2,x", r"sizes must be comma-separated whole numbers"),
        ("sizes:2,0", r"'sizes:2,0'.*every group needs >= 1 class"),
        ("2,-1", r"'2,-1'.*every group needs >= 1 class"),
        ("2.0,3", r"no such file, and not a grouping spec"),
        ("no/such/groups.json", r"no such file.*the forms are"),
    ],
)
def test_parse_bad_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        Groups.parse(spec)


def test_parse_folder_and_types(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not a groups file"):
        Groups.parse(str(tmp_path))
    with pytest.raises(TypeError, match="groups must be"):
        Groups.parse(None)
    with pytest.raises(TypeError, match="groups must be"):
        Groups.parse(3.5)


# ---------------------------------------------------------------------- the reference .npy of group sizes
def test_from_npy(tmp_path):
    p = tmp_path / "taxonomy_level0.npy"
    np.save(p, np.array([398, 521, 9, 7, 52, 8, 3, 2]))
    assert Groups.from_npy(p) == Groups.from_sizes(mosx.IMAGENET_TAXONOMY_SIZES)
    np.save(p, np.array([2, 3], dtype=np.uint8))
    assert Groups.from_npy(p).sizes == (2, 3)


@pytest.mark.parametrize(
    "array, msg",
    [
        (np.array([2.0, 3.0]), r"group sizes must be integers, got dtype float64"),
        (np.array([True, True]), r"group sizes must be integers, got dtype bool"),
        (np.array([2, 0, 3]), r"every group needs >= 1 class, got \(group, size\) \[\(1, 0\)\]"),
        (np.array([2, -3]), r"every group needs >= 1 class, got \(group, size\) \[\(1, -3\)\]"),
        (np.array([[2, 3]]), r"non-empty 1-D array, got shape \(1, 2\)"),
        (np.array([], dtype=np.int64), r"non-empty 1-D array, got shape \(0,\)"),
        (np.array(5), r"non-empty 1-D array, got shape \(\)"),
        (np.array([10**12]), r"more than the 2147483647 mosx supports"),
    ],
)
def test_from_npy_refuses_bad_arrays(tmp_path, array, msg):
    p = tmp_path / "bad.npy"
    np.save(p, array)
    for load in (Groups.from_npy, Groups.parse):
        with pytest.raises(ValueError, match=msg) as e:
            load(str(p))
        assert str(p) in str(e.value)


def test_from_npy_never_unpickles(tmp_path):
    p = tmp_path / "evil.npy"
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    np.save(p, np.array([Payload()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"evil.npy: not a .npy array of group sizes"):
        Groups.parse(str(p))
    assert not marker.exists()
    p.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match=r"evil.npy: not a .npy array"):
        Groups.parse(str(p))


# ---------------------------------------------------------------------- strict integers (issue 12)
@pytest.mark.parametrize(
    "bad",
    [
        [0, 1.0],
        [0, 1.5],
        [0, "1"],
        [0, True],
        [False, 1],
        [0, np.float64(1)],
        [0, np.True_],
        [0, torch.tensor(1.0)],
        [0, torch.tensor(True)],
        [0, None],
    ],
)
def test_assignment_refuses_non_integers(bad):
    with pytest.raises(ValueError, match=r"group ids must be integers, got .* at class 1|at class 0"):
        Groups.from_assignment(bad)


def test_assignment_accepts_integer_scalars():
    want = Groups.from_assignment([0, 1, 1])
    assert Groups.from_assignment([np.int64(0), np.int32(1), 1]) == want
    assert Groups.from_assignment([torch.tensor(0), torch.tensor(1), torch.tensor(1, dtype=torch.int32)]) == want
    assert Groups.from_assignment(np.array([0, 1, 1])) == want
    assert Groups.from_assignment([0, 1, 1], num_groups=np.int64(2)) == want
    with pytest.raises(ValueError, match="num_groups must be integers, got 2.0"):
        Groups.from_assignment([0, 1, 1], num_groups=2.0)
    with pytest.raises(ValueError, match="float32"):
        Groups.from_assignment(torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize(
    "bad, msg",
    [
        ([2.0, 3], r"group sizes must be integers, got 2.0 \(float\) at group 0"),
        ([2, "3"], r"group sizes must be integers, got '3' \(str\) at group 1"),
        ([True, 2], r"group sizes must be integers, got True \(bool\)"),
    ],
)
def test_sizes_refuse_non_integers(bad, msg):
    with pytest.raises(ValueError, match=msg):
        Groups.from_sizes(bad)
    with pytest.raises(ValueError, match=msg):
        mosx.as_groups(tuple(bad))  # the sizes cache must not mix 2.0 or True up with 2 or 1
    assert Groups.from_sizes([np.int64(2), torch.tensor(3)]).sizes == (2, 3)


def test_as_groups_refuses_float_tensors():
    with pytest.raises(ValueError, match="must hold integer sizes or slices, got torch.float32"):
        mosx.as_groups(torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="must hold integer sizes or slices, got torch.float32"):
        mosx.as_groups(torch.tensor([[0.0, 3.0], [3.0, 5.0]]))
    with pytest.raises(ValueError, match="slice bounds must be integers, got 3.5"):
        Groups.from_slices([[0, 3.5]])


def _write_json(path, **data):
    path.write_text(json.dumps({"format": "mosx.groups/1", **data}))
    return path


@pytest.mark.parametrize(
    "data, msg",
    [
        ({"num_groups": 2, "class_to_group": [0, 1.0]}, r"group ids must be integers, got 1.0 \(float\) at class 1"),
        ({"num_groups": 2, "class_to_group": [0, 1.7]}, r"group ids must be integers, got 1.7"),
        ({"num_groups": 2, "class_to_group": [0, "1"]}, r"group ids must be integers, got '1' \(str\)"),
        ({"num_groups": 2, "class_to_group": [0, True]}, r"group ids must be integers, got True \(bool\)"),
        ({"num_groups": "2", "class_to_group": [0, 1]}, r"num_groups must be integers, got '2'"),
        ({"num_groups": 2.0, "class_to_group": [0, 1]}, r"num_groups must be integers, got 2.0"),
        (
            {"num_groups": 2, "class_to_group": [0, 1], "sizes": [1, 2]},
            r"'sizes' \[1, 2\] disagrees with 'class_to_group', which gives \[1, 1\]",
        ),
        ({"num_groups": 2, "class_to_group": [0, 1], "sizes": [1, 1.0]}, r"'sizes' .* disagrees"),
        ({"num_groups": 2, "class_to_group": [0, 1], "sizes": [2]}, r"'sizes' .* disagrees"),
        ({"num_groups": 2, "class_to_group": [0, 1], "sizes": "1,1"}, r"'sizes' .* disagrees"),
        ({"num_groups": 3, "class_to_group": [0, 1]}, r"3 groups but only 2 classes"),
        ({"num_groups": 10**12, "class_to_group": [0, 1]}, r"1000000000000 groups but only 2 classes"),
        ({"num_groups": 2, "class_to_group": [0, 2]}, r"class assigned to group 2 but num_groups=2"),
        ({"num_groups": 2, "class_to_group": [0, -1]}, r"group indices must be >= 0"),
        ({"num_groups": 1, "class_to_group": []}, r"at least one class"),
        ({"num_groups": 2, "class_to_group": {"0": 0}}, r"'class_to_group' must be a list of group ids, got dict"),
        ({"class_to_group": [0, 1]}, r"mosx groups file without 'num_groups'"),
        ({"num_groups": 2}, r"mosx groups file without 'class_to_group'"),
    ],
)
def test_load_refuses_bad_json_naming_the_file(tmp_path, data, msg):
    p = _write_json(tmp_path / "bad.json", **data)
    for load in (Groups.load, Groups.parse):
        with pytest.raises(ValueError, match=msg) as e:
            load(p)
        assert str(e.value).startswith(f"{p}: "), str(e.value)


@pytest.mark.parametrize(
    "text, msg",
    [
        ("{not json", r"invalid JSON: Expecting property name .* at line 1 column 2"),
        ("", r"invalid JSON"),
        ("[1, 2]", r"expected a JSON object, got list"),
        ('"mosx.groups/1"', r"expected a JSON object, got str"),
        ("[" * 100000, r"invalid JSON|nested too deeply"),
        ('{"format": "other"}', r"not a mosx groups file \(format 'other'\)"),
        ('{"format": ["mosx.groups/1"]}', r"not a mosx groups file \(format \['mosx.groups/1'\]\)"),
    ],
)
def test_load_refuses_bad_files_naming_the_file(tmp_path, text, msg):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(ValueError, match=msg) as e:
        Groups.load(p)
    assert str(e.value).startswith(f"{p}: "), str(e.value)


def test_load_refuses_binary_naming_the_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=r"bad.json: not a mosx groups file \(not UTF-8"):
        Groups.load(p)


def test_load_keeps_consistent_sizes(tmp_path):
    p = _write_json(tmp_path / "g.json", num_groups=2, class_to_group=[1, 0, 1], sizes=[1, 2])
    assert Groups.load(p) == Groups.from_assignment([1, 0, 1])
    p = _write_json(tmp_path / "g.json", num_groups=2, class_to_group=[1, 0, 1])  # sizes are optional
    assert Groups.load(p) == Groups.from_assignment([1, 0, 1])


# ---------------------------------------------------------------------- group_labels and ignore_index (issue 12)
def test_group_labels_ignored_rows_stay_ignored():
    g = Groups.from_assignment([1, 0, 1, 0, 2])  # sizes (2, 2, 1): per-group labels 0..2
    t = torch.tensor([0, 1, 3, 4])
    # a marker inside the label range would make an ignored row look like valid labels: refused
    for ii in (0, 1, 2):
        with pytest.raises(ValueError, match=rf"ignore marker {ii} is also a per-group label"):
            g.group_labels(t, ignore_index=ii)
    with pytest.raises(ValueError, match="ignore_index must be integers, got True"):
        g.group_labels(t, ignore_index=True)
    # ignore_index that is a valid class id takes precedence (torch's cross_entropy, the op): class 3 ignored
    lab = g.group_labels(t, ignore_index=3)
    assert lab.tolist() == [[0, 1, 0], [1, 0, 0], [3, 3, 3], [0, 0, 1]]
    # any ignore_index, with a marker outside the label range
    lab = g.group_labels(t, ignore_index=1, label_ignore_index=-100)
    assert lab.tolist() == [[0, 1, 0], [-100, -100, -100], [2, 0, 0], [0, 0, 1]]
    assert g.group_labels(torch.tensor([0, -1]), ignore_index=-1).tolist() == [[0, 1, 0], [-1, -1, -1]]
    with pytest.raises(ValueError, match="label_ignore_index must be integers"):
        g.group_labels(t, ignore_index=1, label_ignore_index=-1.0)


def test_group_labels_with_a_class_id_ignore_index_match_the_op():
    g = Groups.from_assignment([1, 0, 1, 0, 2])
    x = torch.randn(6, g.num_logits, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0, 1, 3, 1, 4, 2])
    lab = g.group_labels(t, ignore_index=1, label_ignore_index=-100)
    want = sum(
        torch.nn.functional.cross_entropy(x[:, a:b], lab[:, k], ignore_index=-100, reduction="sum")
        for k, (a, b) in enumerate(g.slices.tolist())
    )
    got = mosx.group_cross_entropy(x, t, g, ignore_index=1, reduction="sum")
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------- sizes checked before allocating (issue 12)
def _peak_mib(fn):
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


@pytest.mark.parametrize(
    "lines, msg",
    [
        ("a 0 0\nb 100000000 0\n", r"group\(s\) \[1, 2, 3, 4, 5\] never occur \(the largest group id is 100000000\)"),
        ("a 0 0\nb 0 100000000\n", r"pairs \[\(0, 1\), \(0, 2\), \(0, 3\), \(0, 4\), \(0, 5\)\] never occur"),
        ("a 0 0\nb 2 0\n", r"group\(s\) \[1\] never occur"),
        ("a 0 0\nb -1 0\n", r"train.txt:2: negative group or within-group index \(-1, 0\)"),
    ],
)
def test_list_file_checks_ids_against_its_lines(tmp_path, lines, msg):
    p = tmp_path / "train.txt"
    p.write_text(lines)

    def load():
        with pytest.raises(ValueError, match=msg) as e:
            Groups.parse(str(p))
        assert str(p) in str(e.value)

    assert _peak_mib(load) < 16


def test_huge_sizes_fail_at_once():
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"10000000001 logits, more than the 2147483647 mosx supports"):
        Groups.from_sizes([10**10])
    with pytest.raises(ValueError, match=r"10000000001 logits, more than"):
        Groups.parse("10000000000")
    with pytest.raises(ValueError, match="1000000000000 groups but only 2 classes"):
        Groups.from_assignment([0, 1], num_groups=10**12)
    with pytest.raises(ValueError, match="1000000000001 groups but only 2 classes"):
        Groups.from_assignment([0, 10**12])
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.parametrize("groups", [[10**10], [10**8], (5, 10**8), torch.tensor([10**8]), torch.tensor([[0, 10**8]])])
@pytest.mark.parametrize("op", [mosx.group_softmax_score, mosx.group_softmax, mosx.group_predict])
def test_ops_check_the_width_before_building_groups(monkeypatch, op, groups):
    x = torch.randn(2, 5)

    def no_build(*a, **k):
        raise AssertionError("a Groups was built before the width check")

    monkeypatch.setattr(Groups, "__init__", no_build)
    with pytest.raises(ValueError, match=r"logits have 5 columns but the groups need \d+ "):
        op(x, groups)


def test_ops_width_check_of_cross_entropy_is_immediate():
    t0 = time.perf_counter()
    with pytest.raises(
        ValueError,
        match=r"group_cross_entropy: logits have 5 columns but the groups need "
        r"10000000001 \(= 10000000000 classes \+ 1 others slots\)",
    ):
        mosx.group_cross_entropy(torch.randn(2, 5), torch.tensor([0, 1]), [10**10])
    assert time.perf_counter() - t0 < 1.0
    # the right width still works, and a Groups of the wrong width gets the same message
    assert mosx.group_softmax_score(torch.randn(2, 5), [1, 2]).shape == (2,)
    with pytest.raises(ValueError, match=r"logits have 5 columns but the groups need 6"):
        mosx.group_softmax_score(torch.randn(2, 5), Groups.from_sizes([2, 2]))


def test_binary_file_is_refused_naming_the_file(tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes(b"\xff\xfe\x00\x01 garbage\n")
    with pytest.raises(ValueError, match=r"weights.bin:1: expected '<path> <group> <within>'"):
        Groups.parse(str(p), need_data=False)
