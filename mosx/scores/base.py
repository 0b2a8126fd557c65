"""The :class:`Scorer` interface, the registry of scorers and the spec parser, in one place.

A scorer class registers itself when its body sets ``spec_name`` (``__init_subclass__`` does it):
:func:`build_scorer` then finds it under that name and :func:`scorer_names` lists it. Adding a
scorer therefore means one class in one family module (``mosx/scores/<family>.py``) plus its test;
the package ``__init__`` imports every family module, which fills the registry.

Registry attributes a class may set (class attributes, read by :func:`build_scorer`):

``spec_name``     the name in a spec string (also the scorer's ``name`` unless the class sets one);
``needs_groups``  the constructor's first argument is the class grouping (``groups=`` of build_scorer);
``is_wrapper``    the scorer wraps another one: spelled ``<spec_name>-<wrapped spec>`` and built as
                  ``cls(wrapped, head=head, **own)``, ``own`` being the spec keys in ``wrapper_keys``.

This module imports only :mod:`mosx.scores.model`; the families import it, never the reverse.
"""

from __future__ import annotations

import copy

import torch

from .model import LinearHead

# spec name -> class; filled by Scorer.__init_subclass__ in the order the classes are defined.
SCORERS: dict = {}  # scorers of the data: "msp", "energy", ...
WRAPPERS: dict = {}  # scorers around another scorer: "react" (spelled "react-<name>")


class Scorer:
    """Base class. Subclasses set `needs` (data read by score), `fit_needs` (data read by fit; empty
    when no fitting is needed) and implement `_score` (and `_fit`). Setting `spec_name` registers
    the class for :func:`build_scorer`."""

    name = "scorer"
    needs: tuple = ("logits",)
    fit_needs: tuple = ()

    # registry (see the module docstring)
    spec_name: str | None = None
    needs_groups: bool = False
    is_wrapper: bool = False
    wrapper_keys: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        spec = cls.__dict__.get("spec_name")
        if spec is None:
            return
        if "name" not in cls.__dict__:
            cls.name = spec
        _register(cls, spec)

    def __init__(self):
        self._fitted = False

    @property
    def needs_fit(self) -> bool:
        return bool(self.fit_needs)

    @property
    def fitted(self) -> bool:
        return self._fitted or not self.fit_needs

    def fit(self, **data) -> Scorer:
        """Fit on ID data (no-op for methods without statistics). Returns self."""
        if self.fit_needs:
            self._fit(**data)
            self._fitted = True
        return self

    def score(self, **data) -> torch.Tensor:
        """[N] scores, higher = more in-distribution."""
        if not self.fitted:
            raise RuntimeError(f"{self.name}: call fit(...) on ID data before scoring")
        with torch.no_grad() if "inputs" not in self.needs else torch.enable_grad():
            return self._score(**data)

    __call__ = score

    def replace(self, **params) -> Scorer:
        """A copy with some hyperparameters changed (fitted statistics are shared)."""
        new = copy.copy(self)
        for k, v in params.items():
            if not hasattr(new, k):
                raise AttributeError(f"{self.name} has no hyperparameter {k!r}")
            setattr(new, k, v)
        return new

    def _fit(self, **data):
        raise NotImplementedError

    def _score(self, **data):
        raise NotImplementedError

    def __repr__(self):
        def show(v):
            if isinstance(v, LinearHead):
                return f"LinearHead({v.weight.shape[0]}x{v.weight.shape[1]})"
            return repr(v)

        params = {k: v for k, v in vars(self).items()
                  if not k.startswith("_") and k != "name" and not torch.is_tensor(v)}
        return f"{type(self).__name__}({', '.join(f'{k}={show(v)}' for k, v in params.items())})"


# ------------------------------------------------------------------------------ registry
def _register(cls: type, spec: str) -> None:
    if not spec or ":" in spec or "," in spec or "-" in spec:
        raise ValueError(f"{cls.__name__}: spec_name must be a non-empty name without ':', ',' or '-', got {spec!r}")
    table = WRAPPERS if cls.is_wrapper else SCORERS
    prev = SCORERS.get(spec) or WRAPPERS.get(spec)
    if prev is not None and (prev.__module__, prev.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"{cls.__name__}: spec name {spec!r} is taken by {prev.__module__}.{prev.__qualname__}")
    table[spec] = cls


def scorer_names() -> tuple:
    """The spec names :func:`build_scorer` knows, in definition order (each may be wrapped, see
    :func:`wrapper_names`). The ``--scores`` help reads: ``", ".join([*scorer_names(),
    *(f"{w}-<name>" for w in wrapper_names())])``."""
    return tuple(SCORERS)


def wrapper_names() -> tuple:
    """The wrapper spec names (``react``): ``<wrapper>-<name>`` wraps the scorer ``<name>``."""
    return tuple(WRAPPERS)


# ------------------------------------------------------------------------------ spec parser
def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def build_scorer(spec: str, *, groups=None, head: LinearHead | None = None) -> Scorer:
    """A scorer from a spec string: ``name[:key=value,...]``; ``react-<name>`` wraps a logit
    scorer in ReAct (its own key: percentile). Examples: "msp", "energy:temperature=2",
    "odin:temperature=1000,eps=0.0014", "react-energy:percentile=90", "mos" (needs `groups`)."""
    spec = spec.strip()
    name, _, params = spec.partition(":")
    kwargs = {}
    for item in filter(None, (p.strip() for p in params.split(","))):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"scorer spec {spec!r}: parameters are key=value, got {item!r}")
        kwargs[k.strip()] = _parse_value(v.strip())
    wrapper = next((cls for w, cls in WRAPPERS.items() if name.startswith(w + "-")), None)
    base_name = name[len(wrapper.spec_name) + 1:] if wrapper is not None else name
    if base_name not in SCORERS:
        wrapped = "".join(f" (and {w}-<name>)" for w in WRAPPERS)
        raise ValueError(f"unknown scorer {base_name!r} in {spec!r}; known: {', '.join(SCORERS)}{wrapped}")
    wrapper_kwargs = {k: kwargs.pop(k) for k in wrapper.wrapper_keys if k in kwargs} if wrapper is not None else {}
    cls = SCORERS[base_name]
    try:
        if cls.needs_groups:
            if groups is None:
                raise ValueError(f"the {base_name} scorer needs groups")
            base = cls(groups, **kwargs)
        else:
            base = cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"scorer spec {spec!r}: {e}") from None
    return wrapper(base, head=head, **wrapper_kwargs) if wrapper is not None else base
