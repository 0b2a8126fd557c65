"""`Groups`: the one description of how classes are split into MOS groups.

Layout (MOS, Huang & Li 2021): group k with n_k classes owns the contiguous logit slice
offsets[k] .. offsets[k+1]-1 of n_k + 1 logits. Slot 0 of every slice is the group's "others"
logit; slots 1..n_k are the group's classes in ascending class-id order. Slices follow each other
in group order, so L = C + K.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import torch

__all__ = ["Groups", "as_groups"]


class Groups:
    """A partition of C classes into K groups, with the MOS logit layout.

    Build it with :meth:`from_sizes`, :meth:`from_assignment`, :meth:`from_slices`,
    :meth:`from_list_file` or :meth:`load`. Instances are immutable and cache their index tensors
    per device.
    """

    def __init__(self, assignment: Sequence[int], num_groups: int | None = None):
        assignment = [int(g) for g in assignment]
        if not assignment:
            raise ValueError("Groups: there must be at least one class")
        if min(assignment) < 0:
            raise ValueError(f"Groups: group indices must be >= 0, got {min(assignment)}")
        k = max(assignment) + 1 if num_groups is None else int(num_groups)
        if max(assignment) >= k:
            raise ValueError(f"Groups: class assigned to group {max(assignment)} but num_groups={k}")
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
    def from_sizes(cls, sizes: Iterable[int]) -> "Groups":
        """Groups of the given class counts; classes are numbered group by group."""
        sizes = [int(s) for s in sizes]
        if not sizes:
            raise ValueError("Groups.from_sizes: need at least one group")
        bad = [(k, s) for k, s in enumerate(sizes) if s < 1]
        if bad:
            raise ValueError(f"Groups.from_sizes: every group needs >= 1 class, got (group, size) {bad[:10]}")
        return cls([k for k, s in enumerate(sizes) for _ in range(s)], len(sizes))

    @classmethod
    def from_assignment(cls, class_to_group, num_groups: int | None = None) -> "Groups":
        """Class c belongs to group class_to_group[c]; within a group, classes keep id order."""
        if isinstance(class_to_group, torch.Tensor):
            class_to_group = class_to_group.tolist()
        return cls(list(class_to_group), num_groups)

    @classmethod
    def from_slices(cls, slices) -> "Groups":
        """From the reference code's `group_slices`: a [K, 2] table of [start, end) per group."""
        return cls.from_sizes(_sizes_of_slices(slices))

    @classmethod
    def from_offsets(cls, offsets) -> "Groups":
        o = torch.as_tensor(offsets).tolist()
        if len(o) < 2:
            raise ValueError(f"Groups.from_offsets: need K + 1 >= 2 offsets, got {len(o)}")
        return cls.from_slices([[o[k], o[k + 1]] for k in range(len(o) - 1)])


    @classmethod
    def from_list_file(cls, path: str | os.PathLike) -> "Groups":
        """From the reference list-file format: lines `<path> <group> <within-group index>`.

        The within-group index is 0-based (the per-group training label is within + 1, slot 0 being
        others). Classes are numbered group by group, in (group, within) order.
        """
        pairs = set()
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) < 3:
                    raise ValueError(f"{path}:{lineno}: expected '<path> <group> <within>', got {line.strip()!r}")
                try:
                    pairs.add((int(parts[-2]), int(parts[-1])))
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: group and within-group index must be integers") from None
        if not pairs:
            raise ValueError(f"{path}: no entries")
        k = max(g for g, _ in pairs) + 1
        sizes = [0] * k
        for g, j in pairs:
            if g < 0 or j < 0:
                raise ValueError(f"{path}: negative group or within-group index ({g}, {j})")
            sizes[g] = max(sizes[g], j + 1)
        missing = [(g, j) for g in range(k) for j in range(sizes[g]) if (g, j) not in pairs]
        if missing:
            raise ValueError(f"{path}: (group, within) pairs {missing[:5]} never occur; "
                             "each group's within-group indices must be 0..n-1")
        return cls.from_sizes(sizes)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Groups":
        with open(path) as f:
            data = json.load(f)
        if data.get("format") != "mosx.groups/1":
            raise ValueError(f"{path}: not a mosx groups file (format {data.get('format')!r})")
        return cls.from_assignment(data["class_to_group"], data["num_groups"])

    def save(self, path: str | os.PathLike) -> None:
        """Small JSON file (written atomically): the class -> group assignment."""
        data = {"format": "mosx.groups/1", "num_groups": self.num_groups,
                "sizes": list(self._sizes), "class_to_group": list(self._assignment)}
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
            mk = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
            t = {"offsets": mk(self._offsets), "class_logit": mk(self._class_logit),
                 "logit_class": mk(self._logit_class), "sizes": mk(self._sizes),
                 "class_group": mk(self._assignment), "class_within": mk(self._within)}
            self._cache[device] = t
        return t

    # ------------------------------------------------------------------ labels
    def group_labels(self, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """[N] global class ids -> [N, K] per-group labels (0 = others, j+1 = class j of the group).

        Rows equal to ignore_index become ignore_index in every group.
        """
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
        labels[ignore] = ignore_index
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


def as_groups(groups) -> Groups:
    """Accept a Groups, a sequence of group sizes, or a [K, 2] slices tensor / nested list."""
    if isinstance(groups, Groups):
        return groups
    if isinstance(groups, torch.Tensor):
        if groups.dim() == 2 and groups.shape[1] == 2:
            return _slices_cached(groups)
        if groups.dim() == 1:
            return Groups.from_sizes(groups.tolist())
        raise ValueError(f"groups: a tensor must be [K, 2] slices or [K] sizes, got shape {tuple(groups.shape)}")
    if isinstance(groups, (list, tuple)):
        if groups and isinstance(groups[0], (list, tuple)):
            return _sizes_cached(tuple(_sizes_of_slices([list(r) for r in groups])))
        return _sizes_cached(tuple(int(s) for s in groups))
    raise TypeError(f"groups must be a mosx.Groups, a list of group sizes or a [K, 2] slices tensor, got {type(groups).__name__}")


def _sizes_of_slices(slices) -> list:
    """Validated class counts of a [K, 2] table of [start, end) logit slices."""
    s = torch.as_tensor(slices).tolist() if not isinstance(slices, list) else slices
    if not s or any(len(r) != 2 for r in s):
        raise ValueError(f"Groups.from_slices: expected a [K, 2] table of [start, end), got {slices!r:.80}")
    if s[0][0] != 0:
        raise ValueError(f"Groups.from_slices: the first group must start at logit 0, got {s[0][0]}")
    for k, (a, b) in enumerate(s):
        if b - a < 2:
            raise ValueError(
                f"Groups.from_slices: group {k} spans [{a}, {b}), it needs an others slot and >= 1 class")
        if k + 1 < len(s) and s[k + 1][0] != b:
            raise ValueError(
                f"Groups.from_slices: group {k + 1} starts at {s[k + 1][0]} but group {k} ends at {b}; "
                "slices must be contiguous and in order")
    return [b - a - 1 for a, b in s]


_SIZES_CACHE: dict = {}


def _sizes_cached(sizes: tuple) -> Groups:
    g = _SIZES_CACHE.get(sizes)
    if g is None:
        if len(_SIZES_CACHE) > 64:
            _SIZES_CACHE.clear()
        g = _SIZES_CACHE[sizes] = Groups.from_sizes(sizes)
    return g


def _slices_cached(slices: torch.Tensor) -> Groups:
    # One host read of a small [K, 2] table; then the same cache as sizes.
    return _sizes_cached(tuple(_sizes_of_slices(slices.detach().to("cpu", torch.int64).tolist())))
