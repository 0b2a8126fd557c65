"""`Groups`: the one description of how classes are split into MOS groups.

Layout (MOS, Huang & Li 2021): group k with n_k classes owns the contiguous logit slice
offsets[k] .. offsets[k+1]-1 of n_k + 1 logits. Slot 0 of every slice is the group's "others"
logit; slots 1..n_k are the group's classes in ascending class-id order. Slices follow each other
in group order, so L = C + K.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Groups", "GroupRequest", "as_groups", "MAX_LOGITS"]

# The most logits (C + K) a grouping may have: the CUDA kernels index a row's logits in int32. Checked
# from the sizes before any per-class table is built, so one huge number fails at once.
MAX_LOGITS = 2**31 - 1

# The spec forms, for error messages.
_FORMS = (
    "sizes '398,521,...' or 'sizes:398,521,...', a groups .json (mosx train writes OUT/groups.json), "
    "a reference list file ('<path> <group> <within>' lines), a .npy array of group sizes "
    "(MOS group_config/taxonomy_level0.npy)"
)
_REQUEST_FORMS = "kmeans:K, random:K, taxonomy:FILE or list (built from the training data by mosx train)"
_REQUEST_KINDS = ("kmeans", "random", "taxonomy", "list")


def _int(v, what: str, where: str = "") -> int:
    """v as a Python int if it is an integer (Python, NumPy or one-element torch integer); bools,
    floats, strings and the like are refused with a ValueError naming the value."""
    if type(v) is int:
        return v
    ok = not isinstance(v, bool) and type(v).__name__ not in ("bool_", "bool")
    if isinstance(v, torch.Tensor):
        ok = ok and v.dtype != torch.bool and not v.is_floating_point() and not v.is_complex()
    if ok:
        try:
            return operator.index(v)
        except TypeError:
            pass
    raise ValueError(f"{what} must be integers, got {v!r:.60} ({type(v).__name__}){where}")


def _ints(values, what: str, label: str = "entry") -> list:
    return [v if type(v) is int else _int(v, what, f" at {label} {i}") for i, v in enumerate(values)]


@dataclass(frozen=True)
class GroupRequest:
    """A grouping that needs the training data to build, as :meth:`Groups.parse` reads it from
    `kmeans:K`, `random:K`, `taxonomy:FILE` or `list`; `mosx.train.grouping.resolve_groups`
    resolves it.

    kind: "kmeans" (K-means over class-mean backbone features, k groups), "random" (k groups of
    near-equal size), "taxonomy" (path: a class name -> group name file), "list" (the grouping the
    training list file defines).
    """

    kind: str
    k: int | None = None
    path: str | None = None

    def __post_init__(self):
        if self.kind not in _REQUEST_KINDS:
            raise ValueError(f"GroupRequest: kind must be one of {_REQUEST_KINDS}, got {self.kind!r}")
        if self.kind in ("kmeans", "random"):
            k = _int(self.k, f"GroupRequest({self.kind}): k")
            if k < 1 or self.path is not None:
                raise ValueError(
                    f"GroupRequest: {self.kind} needs k >= 1 and no path, got k={self.k}, path={self.path!r}"
                )
            object.__setattr__(self, "k", k)
        elif self.kind == "taxonomy":
            if not self.path or self.k is not None:
                raise ValueError(f"GroupRequest: taxonomy needs a path and no k, got k={self.k}, path={self.path!r}")
        elif self.k is not None or self.path is not None:
            raise ValueError("GroupRequest: list takes no k and no path")

    def __str__(self) -> str:
        return {
            "kmeans": f"kmeans:{self.k}",
            "random": f"random:{self.k}",
            "taxonomy": f"taxonomy:{self.path}",
            "list": "list",
        }[self.kind]


class Groups:
    """A partition of C classes into K groups, with the MOS logit layout.

    Build it with :meth:`from_sizes`, :meth:`from_assignment`, :meth:`from_slices`,
    :meth:`from_list_file` or :meth:`load`. Instances are immutable and cache their index tensors
    per device.
    """

    def __init__(self, assignment: Sequence[int], num_groups: int | None = None):
        assignment = _ints(assignment, "Groups: group ids", "class")
        if not assignment:
            raise ValueError("Groups: there must be at least one class")
        if min(assignment) < 0:
            raise ValueError(f"Groups: group indices must be >= 0, got {min(assignment)}")
        k = max(assignment) + 1 if num_groups is None else _int(num_groups, "Groups: num_groups")
        if max(assignment) >= k:
            raise ValueError(f"Groups: class assigned to group {max(assignment)} but num_groups={k}")
        # Cheap invariants before the per-group tables: every group needs a class.
        if k > len(assignment):
            raise ValueError(
                f"Groups: {k} groups but only {len(assignment)} classes: some group has no class; "
                "every group needs >= 1"
            )
        sizes = [0] * k
        for g in assignment:
            sizes[g] += 1
        empty = [g for g, s in enumerate(sizes) if s == 0]
        if empty:
            raise ValueError(f"Groups: group(s) {empty[:10]} have no class; every group needs >= 1")
        self._assignment = tuple(assignment)
        self._sizes = tuple(sizes)
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + s + 1)
        self._offsets = tuple(offsets)
        # Within-group position of each class: its rank among its group's class ids.
        seen = [0] * k
        within = []
        for g in assignment:
            within.append(seen[g])
            seen[g] += 1
        self._within = tuple(within)
        self._class_logit = tuple(offsets[g] + 1 + j for g, j in zip(assignment, within))
        logit_class = [-1] * offsets[-1]
        for c, pos in enumerate(self._class_logit):
            logit_class[pos] = c
        self._logit_class = tuple(logit_class)
        self._cache: dict = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_sizes(cls, sizes: Iterable[int]) -> Groups:
        """Groups of the given class counts; classes are numbered group by group."""
        sizes = _check_sizes(sizes)
        return cls([k for k, s in enumerate(sizes) for _ in range(s)], len(sizes))

    @classmethod
    def from_assignment(cls, class_to_group, num_groups: int | None = None) -> Groups:
        """Class c belongs to group class_to_group[c]; within a group, classes keep id order."""
        if isinstance(class_to_group, torch.Tensor):
            if class_to_group.dtype == torch.bool or class_to_group.is_floating_point() or class_to_group.is_complex():
                raise ValueError(
                    f"Groups.from_assignment: group ids must be integers, got a {class_to_group.dtype} tensor"
                )
            class_to_group = class_to_group.tolist()
        return cls(list(class_to_group), num_groups)

    @classmethod
    def from_slices(cls, slices) -> Groups:
        """From the reference code's `group_slices`: a [K, 2] table of [start, end) per group."""
        return cls.from_sizes(_sizes_of_slices(slices))

    @classmethod
    def from_offsets(cls, offsets) -> Groups:
        o = torch.as_tensor(offsets).tolist()
        if len(o) < 2:
            raise ValueError(f"Groups.from_offsets: need K + 1 >= 2 offsets, got {len(o)}")
        return cls.from_slices([[o[k], o[k + 1]] for k in range(len(o) - 1)])

    @classmethod
    def from_list_file(cls, path: str | os.PathLike) -> Groups:
        """From the reference list-file format: lines `<path> <group> <within-group index>`.

        The within-group index is 0-based (the per-group training label is within + 1, slot 0 being
        others). Classes are numbered group by group, in (group, within) order. Group ids must be
        0..K-1 and every group's within-group indices 0..n-1, with no gap; this is checked on the
        pairs the file holds before anything sized by their values is built.
        """
        pairs = set()
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) < 3:
                    raise ValueError(f"{path}:{lineno}: expected '<path> <group> <within>', got {line.strip()!r}")
                try:
                    g, j = int(parts[-2]), int(parts[-1])
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: group and within-group index must be integers") from None
                if g < 0 or j < 0:
                    raise ValueError(f"{path}:{lineno}: negative group or within-group index ({g}, {j})")
                pairs.add((g, j))
        if not pairs:
            raise ValueError(f"{path}: no entries")
        within: dict = {}
        for g, j in pairs:
            within.setdefault(g, []).append(j)
        missing_groups = _gaps(sorted(within))
        if missing_groups:
            raise ValueError(
                f"{path}: group(s) {missing_groups} never occur (the largest group id is "
                f"{max(within)}); group ids must be 0..K-1 with no gap"
            )
        missing = [(g, j) for g in sorted(within) for j in _gaps(sorted(within[g]), 5)][:5]
        if missing:
            raise ValueError(
                f"{path}: (group, within) pairs {missing} never occur; each group's within-group indices must be 0..n-1"
            )
        return cls.from_sizes([len(within[g]) for g in range(len(within))])

    @classmethod
    def from_npy(cls, path: str | os.PathLike) -> Groups:
        """From the reference code's `.npy` of group sizes (MOS `group_config/taxonomy_level0.npy`): a
        1-D integer array, one class count >= 1 per group. Loaded without pickle."""
        import numpy as np

        try:
            a = np.load(path, allow_pickle=False)
        except OSError:
            raise
        except Exception as e:  # pickled data, a corrupt header, ...
            raise ValueError(f"{path}: not a .npy array of group sizes ({e})") from None
        if not isinstance(a, np.ndarray):
            raise ValueError(f"{path}: not a .npy array of group sizes (an .npz archive?)")
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"{path}: a .npy of group sizes must be a non-empty 1-D array, got shape {a.shape}")
        if a.dtype.kind not in "iu":
            raise ValueError(
                f"{path}: group sizes must be integers, got dtype {a.dtype} (first values {a[:5].tolist()})"
            )
        bad = np.flatnonzero(a < 1)
        if bad.size:
            raise ValueError(
                f"{path}: every group needs >= 1 class, got (group, size) {[(int(k), int(a[k])) for k in bad[:10]]}"
            )
        try:
            return cls.from_sizes(a.tolist())
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> Groups:
        """From a mosx groups JSON file (:meth:`save`): {"format": "mosx.groups/1", "num_groups": K,
        "class_to_group": [...], "sizes": [...] (optional, checked against class_to_group)}.
        Every error names the file and what is wrong."""
        with open(path, "rb") as f:
            raw = f.read()
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a mosx groups file (not UTF-8 JSON text)") from None
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: not a mosx groups file (invalid JSON: {e.msg} at line {e.lineno} column {e.colno})"
            ) from None
        except RecursionError:
            raise ValueError(f"{path}: not a mosx groups file (JSON nested too deeply)") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: not a mosx groups file (expected a JSON object, got {type(data).__name__})")
        if data.get("format") != "mosx.groups/1":
            raise ValueError(f"{path}: not a mosx groups file (format {data.get('format')!r:.60})")
        for key in ("num_groups", "class_to_group"):
            if key not in data:
                raise ValueError(f"{path}: mosx groups file without {key!r}")
        if not isinstance(data["class_to_group"], list):
            raise ValueError(
                f"{path}: 'class_to_group' must be a list of group ids, got {type(data['class_to_group']).__name__}"
            )
        try:
            g = cls.from_assignment(data["class_to_group"], data["num_groups"])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if "sizes" in data:
            sizes = data["sizes"]
            if (
                not isinstance(sizes, list)
                or len(sizes) != g.num_groups
                or any(type(v) is not int or v != w for v, w in zip(sizes, g.sizes))
            ):
                raise ValueError(
                    f"{path}: 'sizes' {sizes!r:.80} disagrees with 'class_to_group', which gives {list(g.sizes)!r:.80}"
                )
        return g

    @classmethod
    def parse(cls, spec, *, need_data: bool = True) -> Groups | GroupRequest:
        """The one reader of a grouping spec (every command's --groups, and the Python API).

        Forms that need no data give a Groups:
          - a Groups (returned as is); a sequence of sizes, a [K] sizes or [K, 2] slices tensor or
            array (as :func:`as_groups`);
          - `"398,521,..."` or `"sizes:398,521,..."`: group sizes;
          - a file: a `.npy` array of group sizes (:meth:`from_npy`, known by its magic bytes), a
            groups JSON (:meth:`load`; a `.json` name or a text starting with `{`), else a reference
            list file (:meth:`from_list_file`).
        Forms that need the training data give a :class:`GroupRequest` for
        `mosx.train.grouping.resolve_groups`: `kmeans:K`, `random:K`, `taxonomy:FILE`, `list`.
        The keywords come first (`list` is the request even where a file of that name exists; write
        `./list` for the file).

        need_data: False where no training data are at hand (mosx eval): those forms are refused
        with a ValueError that lists the forms taken, so the result is always a Groups.
        """
        if isinstance(spec, Groups):
            return spec
        if isinstance(spec, GroupRequest):
            return _refuse_request(spec, str(spec)) if not need_data else spec
        if not isinstance(spec, (str, os.PathLike)):
            if type(spec).__module__ == "numpy":
                spec = torch.as_tensor(spec)
            return as_groups(spec)
        text = os.fsdecode(os.fspath(spec))
        s = text.strip()
        kind, colon, arg = s.partition(":")
        kind = kind.strip()
        if colon and kind == "sizes":
            return _parse_sizes(arg, text, strict=True)
        if (colon and kind in ("kmeans", "random", "taxonomy")) or s == "list":
            if s == "list":
                req = GroupRequest("list")
            elif kind == "taxonomy":
                if not arg.strip():
                    raise ValueError(f"--groups {text!r}: taxonomy:FILE needs a file")
                req = GroupRequest("taxonomy", path=arg.strip())
            else:
                a = arg.strip()
                if not (a.isascii() and a.isdigit()) or int(a) < 1:
                    raise ValueError(f"--groups {text!r}: {kind}:K needs a whole number of groups K >= 1, got {a!r}")
                req = GroupRequest(kind, k=int(a))
            return _refuse_request(req, text) if not need_data else req
        if os.path.isfile(text):
            return cls._from_file(text)
        if os.path.isdir(text):
            raise ValueError(
                f"--groups {text!r} is a folder, not a groups file; the forms are: {_FORMS}; or {_REQUEST_FORMS}"
            )
        g = _parse_sizes(s, text, strict=False)
        if g is not None:
            return g
        raise ValueError(
            f"--groups {text!r}: no such file, and not a grouping spec; the forms are: {_FORMS}; or {_REQUEST_FORMS}"
        )

    @classmethod
    def _from_file(cls, path: str) -> Groups:
        with open(path, "rb") as f:
            head = f.read(64)
        if head.startswith(b"\x93NUMPY") or path.lower().endswith(".npy"):
            return cls.from_npy(path)
        if path.lower().endswith(".json") or head.lstrip()[:1] == b"{":
            return cls.load(path)
        return cls.from_list_file(path)

    def save(self, path: str | os.PathLike) -> None:
        """Small JSON file (written atomically): the class -> group assignment."""
        data = {
            "format": "mosx.groups/1",
            "num_groups": self.num_groups,
            "sizes": list(self._sizes),
            "class_to_group": list(self._assignment),
        }
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)

    # ------------------------------------------------------------------ properties
    @property
    def sizes(self) -> tuple[int, ...]:
        return self._sizes

    @property
    def num_groups(self) -> int:
        return len(self._sizes)

    @property
    def num_classes(self) -> int:
        return len(self._assignment)

    @property
    def num_logits(self) -> int:
        return self._offsets[-1]

    @property
    def class_to_group(self) -> tuple[int, ...]:
        return self._assignment

    @property
    def class_within(self) -> tuple[int, ...]:
        """0-based position of every class inside its group."""
        return self._within

    @property
    def offsets(self) -> torch.Tensor:
        """[K + 1] int64: group k owns logits offsets[k] .. offsets[k+1]-1 (others first)."""
        return self.tensors("cpu")["offsets"].clone()

    @property
    def slices(self) -> torch.Tensor:
        """[K, 2] int64 [start, end) per group: the reference code's `group_slices`."""
        o = self.offsets
        return torch.stack([o[:-1], o[1:]], dim=1)

    @property
    def class_logit(self) -> torch.Tensor:
        """[C] int64: the logit position of every class."""
        return self.tensors("cpu")["class_logit"].clone()

    @property
    def logit_class(self) -> torch.Tensor:
        """[L] int64: the class of every logit position, -1 for others slots."""
        return self.tensors("cpu")["logit_class"].clone()

    def tensors(self, device) -> dict:
        """Index tensors on `device` (cached): offsets, class_logit, logit_class, sizes, class_group, class_within."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        t = self._cache.get(device)
        if t is None:
            mk = lambda v: torch.tensor(v, dtype=torch.int64, device=device)
            t = {
                "offsets": mk(self._offsets),
                "class_logit": mk(self._class_logit),
                "logit_class": mk(self._logit_class),
                "sizes": mk(self._sizes),
                "class_group": mk(self._assignment),
                "class_within": mk(self._within),
            }
            self._cache[device] = t
        return t

    # ------------------------------------------------------------------ labels
    def group_labels(
        self, targets: torch.Tensor, ignore_index: int = -100, *, label_ignore_index: int | None = None
    ) -> torch.Tensor:
        """[N] global class ids -> [N, K] per-group labels (0 = others, j+1 = class j of the group).

        Rows equal to ignore_index are ignored rows, even where ignore_index is also a valid class id
        (it takes precedence, as in torch's cross_entropy and mosx.group_cross_entropy): they become
        label_ignore_index (default: ignore_index) in every group, and no other entry does. So the
        marker must lie outside the per-group label range 0..max(sizes); a marker inside it would make
        an ignored row look like valid labels (and valid labels look ignored), and is refused: use a
        negative ignore_index, or pass e.g. label_ignore_index=-100.
        """
        ignore_index = _int(ignore_index, "group_labels: ignore_index")
        mark = (
            ignore_index if label_ignore_index is None else _int(label_ignore_index, "group_labels: label_ignore_index")
        )
        if 0 <= mark <= max(self._sizes):
            raise ValueError(
                f"group_labels: ignore marker {mark} is also a per-group label (0 = others, 1..{max(self._sizes)} "
                "= classes); ignored rows could not be told from valid ones. Use a negative ignore_index "
                "(e.g. -100), or give label_ignore_index=-100 for the per-group labels"
            )
        targets = torch.as_tensor(targets)
        if targets.dim() != 1:
            raise ValueError(f"group_labels: targets must be [N] class ids, got shape {tuple(targets.shape)}")
        if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"group_labels: targets must be integer class ids, got {targets.dtype}")
        targets = targets.long()
        t = self.tensors(targets.device)
        ignore = targets == ignore_index
        bad = (~ignore) & ((targets < 0) | (targets >= self.num_classes))
        if bool(bad.any()):
            v = targets[bad][0].item()
            raise ValueError(f"group_labels: class id {v} out of range [0, {self.num_classes})")
        safe = torch.where(ignore, torch.zeros_like(targets), targets)
        labels = torch.zeros(targets.shape[0], self.num_groups, dtype=torch.int64, device=targets.device)
        labels.scatter_(1, t["class_group"][safe].unsqueeze(1), (t["class_within"][safe] + 1).unsqueeze(1))
        labels[ignore] = mark
        return labels

    def classes_of(self, group: int) -> list[int]:
        return [c for c, g in enumerate(self._assignment) if g == group]

    # ------------------------------------------------------------------ dunder
    def __eq__(self, other) -> bool:
        return isinstance(other, Groups) and self._assignment == other._assignment and self._sizes == other._sizes

    def __hash__(self) -> int:
        return hash((self._assignment, self._sizes))

    def __repr__(self) -> str:
        s = list(self._sizes)
        shown = s if len(s) <= 10 else s[:8] + ["..."]
        return f"Groups(num_groups={self.num_groups}, num_classes={self.num_classes}, sizes={shown})"

    def __len__(self) -> int:
        return self.num_groups


def _refuse_request(req: GroupRequest, text: str):
    what = "list" if req.kind == "list" else f"{req.kind}:{'FILE' if req.kind == 'taxonomy' else 'K'}"
    hint = " (the grouping of the training list file: give that list file itself)" if req.kind == "list" else ""
    raise ValueError(
        f"--groups {text!r}: {what} needs training data{hint}, which only mosx train has; "
        f"mosx eval takes a grouping given in full: {_FORMS}"
    )


def _check_sizes(sizes, num_logits: int | None = None, fn: str = "groups") -> list:
    """Validated group sizes (Python ints >= 1, at least one group, at most MAX_LOGITS logits and,
    where given, exactly num_logits): the cheap invariants, checked before anything of the sizes'
    magnitude is built."""
    sizes = _ints(sizes, "Groups.from_sizes: group sizes", "group")
    if not sizes:
        raise ValueError("Groups.from_sizes: need at least one group")
    bad = [(k, s) for k, s in enumerate(sizes) if s < 1]
    if bad:
        raise ValueError(f"Groups.from_sizes: every group needs >= 1 class, got (group, size) {bad[:10]}")
    c, k = sum(sizes), len(sizes)
    if num_logits is not None and c + k != num_logits:
        raise ValueError(
            f"{fn}: logits have {num_logits} columns but the groups need {c + k} (= {c} classes + {k} others slots)"
        )
    if c + k > MAX_LOGITS:
        raise ValueError(
            f"Groups.from_sizes: {c} classes in {k} groups need {c + k} logits, "
            f"more than the {MAX_LOGITS} mosx supports"
        )
    return sizes


def _gaps(sorted_values: list, limit: int = 5) -> list:
    """Up to `limit` integers of 0..max(sorted_values) missing from the sorted distinct values,
    found without walking the whole range."""
    out, expect = [], 0
    for v in sorted_values:
        while expect < v and len(out) < limit:
            out.append(expect)
            expect += 1
        if len(out) >= limit:
            break
        expect = v + 1
    return out


def _parse_sizes(body: str, text: str, strict: bool) -> Groups | None:
    """Groups from comma-separated sizes; None (or, strict, a ValueError) if body is not such a list."""
    pieces = [p.strip() for p in body.split(",") if p.strip()]
    if not pieces or not all(p.isascii() and p.lstrip("+-").isdigit() for p in pieces):
        if strict:
            raise ValueError(f"--groups {text!r}: sizes must be comma-separated whole numbers, e.g. sizes:398,521,9")
        return None
    try:
        return Groups.from_sizes([int(p) for p in pieces])
    except ValueError as e:
        raise ValueError(f"--groups {text!r}: {e}") from None


def as_groups(groups, num_logits: int | None = None, fn: str = "groups") -> Groups:
    """Accept a Groups, a sequence of group sizes, or a [K, 2] slices tensor / nested list.

    num_logits: the width of the logits the grouping is for. When given, sizes and slices are
    checked against it before a Groups is built (the ops pass it, so a wrong grouping fails at once
    whatever its sizes); a Groups is returned as is, for the caller to check. fn names the caller
    in errors.
    """
    if isinstance(groups, Groups):
        return groups
    if isinstance(groups, torch.Tensor):
        if groups.dtype == torch.bool or groups.is_floating_point() or groups.is_complex():
            raise ValueError(f"{fn}: a groups tensor must hold integer sizes or slices, got {groups.dtype}")
        if groups.dim() == 2 and groups.shape[1] == 2:
            # One host read of a small [K, 2] table; then the same cache as sizes.
            sizes = _sizes_of_slices(groups.detach().to("cpu", torch.int64).tolist())
        elif groups.dim() == 1:
            sizes = groups.detach().cpu().tolist()
        else:
            raise ValueError(f"groups: a tensor must be [K, 2] slices or [K] sizes, got shape {tuple(groups.shape)}")
    elif isinstance(groups, (list, tuple)):
        if groups and isinstance(groups[0], (list, tuple)):
            sizes = _sizes_of_slices([list(r) for r in groups])
        else:
            sizes = groups
    else:
        raise TypeError(
            f"groups must be a mosx.Groups, a list of group sizes or a [K, 2] slices tensor, "
            f"got {type(groups).__name__}"
        )
    return _sizes_cached(tuple(_check_sizes(sizes, num_logits, fn)))


def _sizes_of_slices(slices) -> list:
    """Validated class counts of a [K, 2] table of [start, end) logit slices."""
    s = torch.as_tensor(slices).tolist() if not isinstance(slices, list) else slices
    if not s or any(len(r) != 2 for r in s):
        raise ValueError(f"Groups.from_slices: expected a [K, 2] table of [start, end), got {slices!r:.80}")
    s = [_ints(r, "Groups.from_slices: slice bounds", f"group {k}, bound") for k, r in enumerate(s)]
    if s[0][0] != 0:
        raise ValueError(f"Groups.from_slices: the first group must start at logit 0, got {s[0][0]}")
    for k, (a, b) in enumerate(s):
        if b - a < 2:
            raise ValueError(f"Groups.from_slices: group {k} spans [{a}, {b}), it needs an others slot and >= 1 class")
        if k + 1 < len(s) and s[k + 1][0] != b:
            raise ValueError(
                f"Groups.from_slices: group {k + 1} starts at {s[k + 1][0]} but group {k} ends at {b}; "
                "slices must be contiguous and in order"
            )
    return [b - a - 1 for a, b in s]


_SIZES_CACHE: dict = {}


def _sizes_cached(sizes: tuple) -> Groups:
    g = _SIZES_CACHE.get(sizes)
    if g is None:
        if len(_SIZES_CACHE) > 64:
            _SIZES_CACHE.clear()
        g = _SIZES_CACHE[sizes] = Groups.from_sizes(sizes)
    return g
