"""The method registry: the hypergradient methods by name, each with its settings.

A method declares its settings once, as its class's ``settings`` (a tuple of ``Setting``), and
is registered by one line, ``register_method(name, cls)``; everything that offers methods by
name derives from the registry: ``make_method(name, **settings)``, ``from_config`` (a
``HyperGradient.get_config()`` back into the method), and the launchers' ``--method`` and one
flag per setting (``far_ho2/launch/method_flags.py``).

    class Scaled(far.HyperGradient):
        settings = (far.Setting("scale", float, 1.0, "the factor of the hypergradient.", low=0.0),)
        ...
    far.register_method("scaled", Scaled)
    method = far.make_method("scaled", scale=2.0)        # Scaled.from_settings(scale=2.0)
"""

import dataclasses
import numbers
from typing import Any, Mapping, Optional

from far_ho2.hypergradients.base import HyperGradient

TYPES = (bool, int, float, str)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting of a method: the keyword of ``make_method`` (and of the class's
    ``from_settings``), its type (bool, int, float or str), its default, one help string, its
    valid values (``choices``, or the interval from ``low`` to ``high``, each end closed unless
    ``low_open`` / ``high_open``), and the launchers' flag (default ``<method>_<name>``).
    ``inner`` marks a setting of the inner optimizer the method needs (e.g. the temperature of
    an SGLD chain): the caller builds that optimizer, ``make_method`` does not take it."""

    name: str
    type: type
    default: Any
    help: str
    choices: Optional[tuple] = None
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    flag: Optional[str] = None
    inner: bool = False

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise TypeError(f"Setting {self.name!r}: `type` must be one of {[t.__name__ for t in TYPES]}, "
                            f"got {self.type!r}.")
        if self.default is not None:
            self.check(self.default, f"the default of {self.name!r}")

    def range(self) -> str:
        """The valid values in words: ``one of ('cg', 'neumann')``, ``an int ≥ 0``, ``a float in
        [0, 1)``."""
        if self.choices is not None:
            return f"one of {self.choices}"
        kind = f"{'an' if self.type is int else 'a'} {self.type.__name__}"
        if self.low is not None and self.high is not None:
            return (f"{kind} in {'(' if self.low_open else '['}{self.low:g}, "
                    f"{self.high:g}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '≥'} {self.low:g}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '≤'} {self.high:g}"
        return kind

    def check(self, value: Any, label: str) -> Any:
        """``value`` as the setting's type (an int for a float becomes a float), or a one-line
        ``ValueError`` naming ``label`` (the argument or flag as the user wrote it); None is
        valid where the default is None."""
        if value is None and self.default is None:
            return None
        expected = {bool: bool, int: numbers.Integral, float: numbers.Real, str: str}[self.type]
        valid = isinstance(value, expected) and (self.type is bool or not isinstance(value, bool))
        if valid:
            value = self.type(value)
            valid = ((self.choices is None or value in self.choices) and
                     (self.low is None or (value > self.low if self.low_open else value >= self.low)) and
                     (self.high is None or (value < self.high if self.high_open else value <= self.high)))
        if not valid:
            raise ValueError(f"{label} must be {self.range()}, got {value!r}.")
        return value


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method: its name (``--method``), its class and the class's settings."""

    name: str
    cls: type
    settings: tuple

    def setting(self, name: str) -> Setting:
        """The setting called ``name``, or a ``ValueError`` listing the method's settings."""
        for setting in self.settings:
            if setting.name == name:
                return setting
        raise ValueError(f"Method {self.name!r} has no setting {name!r}; its settings: "
                         f"{[s.name for s in self.settings]}.")

    def flag(self, setting: Setting) -> str:
        """The launchers' flag of ``setting`` (without the dashes)."""
        return setting.flag or f"{self.name}_{setting.name}"

    def defaults(self, overrides: Optional[Mapping[str, Any]] = None) -> dict:
        """Every setting's default: ``overrides`` (an experiment's) over the registry's; a
        ``ValueError`` for an override that is not a setting."""
        for name in overrides or {}:
            self.setting(name)
        return {s.name: s.default for s in self.settings} | dict(overrides or {})

    def split(self, settings: Mapping[str, Any]) -> tuple[dict, dict]:
        """``settings`` as (the method's, those of the inner optimizer it needs: ``inner``)."""
        inner = {s.name for s in self.settings if s.inner}
        return ({k: v for k, v in settings.items() if k not in inner},
                {k: v for k, v in settings.items() if k in inner})

    def make(self, **settings: Any) -> HyperGradient:
        """The method with ``settings`` (the others at their defaults), checked: one-line
        errors name the setting as an argument (`` `eta` ``)."""
        values = {}
        for name, value in settings.items():
            setting = self.setting(name)
            if setting.inner:
                raise ValueError(f"`{name}` is a setting of the inner optimizer {self.name} needs, not of the "
                                 f"method: give it to that optimizer.")
            values[name] = setting.check(value, f"{self.name}: `{name}`")
        defaults = {s.name: s.default for s in self.settings if not s.inner}
        return self.cls.from_settings(**{**defaults, **values})


_METHODS: dict[str, Method] = {}


def register_method(name: str, cls: type) -> Method:
    """Registers ``cls`` (a ``HyperGradient`` subclass with its ``settings``) as the method
    ``name``; a launcher defines its flags from the methods registered when it defines them.

    Raises:
        ValueError: if ``name`` is taken by another class, or a setting's flag is another
            method's.
        TypeError: if ``cls`` is not a ``HyperGradient`` subclass.
    """
    if not (isinstance(cls, type) and issubclass(cls, HyperGradient)):
        raise TypeError(f"register_method: `cls` must be a far_ho2 HyperGradient subclass, got {cls!r}.")
    if not name.isidentifier():
        raise ValueError(f"register_method: `name` must be an identifier (it prefixes flags), got {name!r}.")
    if name in _METHODS and _METHODS[name].cls is not cls:
        raise ValueError(f"register_method: {name!r} is already {_METHODS[name].cls.__name__}.")
    method = Method(name, cls, tuple(cls.settings))
    taken = {m.flag(s): m.name for m in _METHODS.values() if m.name != name for s in m.settings}
    for setting in method.settings:
        if method.flag(setting) in taken:
            raise ValueError(f"register_method: the flag --{method.flag(setting)} of {name!r} is already a setting "
                             f"of {taken[method.flag(setting)]!r}.")
    _METHODS[name] = method
    return method


def methods() -> tuple[str, ...]:
    """The names of the registered methods, in the order of registration."""
    return tuple(_METHODS)


def get_method(name: str) -> Method:
    """The registered method ``name``, or a ``ValueError`` listing the registered ones."""
    if name not in _METHODS:
        raise ValueError(f"Unknown method {name!r}; registered: {list(_METHODS)}.")
    return _METHODS[name]


def make_method(name: str, **settings: Any) -> HyperGradient:
    """The method registered as ``name`` with ``settings`` (the others at their defaults):
    ``make_method("reverse", truncate=5)``.

    Raises:
        ValueError: for an unknown name (listing the registered ones), an unknown setting, or a
            value outside the setting's range.
    """
    return get_method(name).make(**settings)


def from_config(config: dict) -> HyperGradient:
    """The method a ``HyperGradient.get_config()`` describes (its registered class's
    ``from_config``).

    Raises:
        ValueError: if no registered method has that class.
    """
    name = config.get("class_name")
    found = [m.cls for m in _METHODS.values() if m.cls.__name__ == name]
    if not found:
        raise ValueError(f"Unknown hypergradient method {name!r}; registered: "
                         f"{sorted({m.cls.__name__ for m in _METHODS.values()})}.")
    return found[0].from_config({k: v for k, v in config.items() if k != "class_name"})
