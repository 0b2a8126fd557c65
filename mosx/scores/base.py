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

Strict keywords: :meth:`Scorer.fit` / :meth:`Scorer.score` called with data the scorer does not read
raise a TypeError naming it (``KLMatching().fit(logits=z, labels=y)`` would otherwise silently fit on
predictions). What a scorer reads: ``needs`` + ``score_optional`` for score; ``fit_needs`` +
``fit_optional`` + ``device`` for fit (``fit_optional`` left at None means the named keyword
parameters of the class's ``_fit``). A wrapper (``is_wrapper``) also reads ``head`` and hands its
base scorer the shaped data without knowing which of it the base reads: inside a wrapper's fit /
score, a nested scorer takes what it declares and drops the rest. :func:`~mosx.scores.fit_all` /
:func:`~mosx.scores.score_all` hand each scorer only the data it declares. Keys given as None carry
no data and are dropped.

This module imports only :mod:`mosx.scores.model`; the families import it, never the reverse.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import inspect

import torch

from .model import LinearHead

# spec name -> class; filled by Scorer.__init_subclass__ in the order the classes are defined.
SCORERS: dict = {}  # scorers of the data: "msp", "energy", ...
WRAPPERS: dict = {}  # scorers around another scorer: "react" (spelled "react-<name>")

# True while a wrapper's fit/score runs: the scorer it wraps takes the data it declares, drops the rest.
_HANDED_DOWN = contextvars.ContextVar("mosx_scores_handed_down", default=False)


class Scorer:
    """Base class. Subclasses set `needs` (data read by score), `fit_needs` (data read by fit; empty
    when no fitting is needed) and implement `_score` (and `_fit`). Setting `spec_name` registers
    the class for :func:`build_scorer`."""

    name = "scorer"
    needs: tuple = ("logits",)
    fit_needs: tuple = ()
    score_optional: tuple = ()  # data score() also reads when given (besides `needs`)
    fit_optional: tuple | None = None  # ... fit() also reads (besides fit_needs, device); None: _fit's keywords
    fit_params: tuple = ()  # hyperparameters the fitted statistics depend on: replace() of one needs a refit

    # registry (see the module docstring)
    spec_name: str | None = None
    needs_groups: bool = False
    is_wrapper: bool = False
    wrapper_keys: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.is_wrapper and "fit" in cls.__dict__:  # a wrapper's own fit(): strict, then hands down
            cls.fit = _wrapper_fit(cls.__dict__["fit"])
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

    @property
    def fit_accepts(self) -> frozenset:
        """The keywords fit() reads: fit_needs, fit_optional (default: the named keyword parameters
        of ``_fit``) and ``device``; a wrapper adds ``head`` and what its base's fit reads except
        ``logits`` (the wrapper recomputes them from the shaped features)."""
        optional = self.fit_optional
        if optional is None:
            optional = _keywords(type(self)._fit)
        keys = set(self.fit_needs) | set(optional) | {"device"}
        if self.is_wrapper:
            keys.add("head")
            base = getattr(self, "base", None)
            if isinstance(base, Scorer):  # what the base reads, but logits: the wrapper computes those
                keys |= base.fit_accepts - {"logits"}
        return frozenset(keys)

    @property
    def accepts(self) -> frozenset:
        """The keywords score() reads: needs and score_optional (a wrapper adds ``head``)."""
        keys = set(self.needs) | set(self.score_optional)
        if self.is_wrapper:
            keys.add("head")
        return frozenset(keys)

    def search_space(self) -> dict:
        """Hyperparameter -> candidate values (the paper's grid) for a validation search; {} when
        the method has none to tune. Keys are constructor / :meth:`replace` parameters."""
        return {}

    def _take(self, data: dict, allowed: frozenset, required, what: str) -> dict:
        """`data` checked against what the scorer reads: extra keys raise (or, handed down by a
        wrapper, are dropped). When some required data is missing the scorer's own message says so."""
        data = {k: v for k, v in data.items() if v is not None}
        extra = sorted(set(data) - allowed)
        if not extra:
            return data
        if _HANDED_DOWN.get():
            return {k: v for k, v in data.items() if k in allowed}
        if all(k in data for k in required):
            raise TypeError(
                f"{self.name}: {what}() got {', '.join(f'`{k}`' for k in extra)}, which it does not read "
                f"(it reads {', '.join(f'`{k}`' for k in sorted(allowed))})"
            )
        return data

    def fit(self, **data) -> Scorer:
        """Fit on ID data (no-op for methods without statistics). Returns self.
        Raises TypeError on data it does not read (see the module docstring)."""
        data = self._take(data, self.fit_accepts, self.fit_needs, "fit")
        if self.fit_needs:
            token = _HANDED_DOWN.set(True) if self.is_wrapper else None
            try:
                self._fit(**data)
            finally:
                if token is not None:
                    _HANDED_DOWN.reset(token)
            self._fitted = True
        return self

    def score(self, **data) -> torch.Tensor:
        """[N] scores, higher = more in-distribution. Raises TypeError on data it does not read."""
        required = [k for k in self.needs if not (k == "head" and getattr(self, "head", None) is not None)]
        data = self._take(data, self.accepts, required, "score")
        if not self.fitted:
            raise RuntimeError(f"{self.name}: call fit(...) on ID data before scoring")
        token = _HANDED_DOWN.set(True) if self.is_wrapper else None
        try:
            with torch.no_grad() if "inputs" not in self.needs else torch.enable_grad():
                return self._score(**data)
        finally:
            if token is not None:
                _HANDED_DOWN.reset(token)

    __call__ = score

    def replace(self, **params) -> Scorer:
        """A copy with some hyperparameters changed (fitted statistics are shared; changing one of
        ``fit_params`` leaves the copy unfitted)."""
        new = copy.copy(self)
        for k, v in params.items():
            if not hasattr(new, k):
                raise AttributeError(f"{self.name} has no hyperparameter {k!r}")
            if k in self.fit_params and getattr(new, k) != v:
                new._fitted = False  # e.g. ViM's dim: the copy must be fitted again before scoring
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

        params = {
            k: v for k, v in vars(self).items() if not k.startswith("_") and k != "name" and not torch.is_tensor(v)
        }
        return f"{type(self).__name__}({', '.join(f'{k}={show(v)}' for k, v in params.items())})"


def _keywords(fn) -> tuple:
    """The named keyword parameters of a method (``**rest`` and ``self`` excluded)."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _wrapper_fit(fit):
    """A wrapper class's own fit(): checks its keywords, then runs with nested scorers taking only
    the data they declare."""

    @functools.wraps(fit)
    def run(self, **data):
        data = self._take(data, self.fit_accepts, self.fit_needs, "fit")
        token = _HANDED_DOWN.set(True)
        try:
            return fit(self, **data)
        finally:
            _HANDED_DOWN.reset(token)

    return run


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
    base_name = name[len(wrapper.spec_name) + 1 :] if wrapper is not None else name
    if base_name not in SCORERS:
        wrapped = f" (and {', '.join(f'{w}-<name>' for w in WRAPPERS)})" if WRAPPERS else ""
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
