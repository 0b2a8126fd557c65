import json

import pytest
import torch

import mosx
from mosx import Groups


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


@pytest.mark.parametrize("bad, msg", [
    ([], "at least one group"),
    ([3, 0, 2], "needs >= 1 class"),
])
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
