"""Component registry and per-decoder plugin managers.

Built-in components are plugins like any other (after simonw/llm's DEFAULT_PLUGINS): their modules implement
``propd_register_components`` and are registered the same way third-party packages are found, through the
``propd`` entry-point group. Nothing here is global: every call builds a fresh manager.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Callable, Iterable, Sequence

import attrs
import pluggy

from propd import hookspecs
from propd.errors import PropdError

ROLES = ("sizer", "proposer", "pruner", "verifier")
DEFAULT_PLUGINS = ("propd.strategies.static", "propd.strategies.medusa", "propd.strategies.greedy",
                   "propd.strategies.early_prune", "propd.strategies.heuristic", "propd.strategies.dynamic",
                   "propd.strategies.typical",
                   "propd.strategies.composite", "propd.strategies.sampling", "propd.strategies.eagle")


@attrs.frozen
class Component:
    role: str
    name: str
    factory: Callable[[Any], Any]
    config_cls: type | None = None
    description: str = ""

    def build(self, options: dict[str, Any] | None = None) -> Any:
        options = dict(options or {})
        if self.config_cls is None:
            if options:
                raise PropdError(f"{self.role} {self.name!r} takes no options, got {sorted(options)}")
            return self.factory(None)
        known = {f.name for f in attrs.fields(self.config_cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise PropdError(f"{self.role} {self.name!r} has no option(s) {unknown}; it takes {sorted(known)}")
        try:
            hints = typing.get_type_hints(self.config_cls)
        except Exception:  # unresolvable annotations: leave the checks to the config class
            hints = {}
        for key, value in options.items():
            if key in hints and not _fits(value, hints[key]):
                raise PropdError(f"option {key} of {self.role} {self.name!r} must be {_describe(hints[key])}, "
                                 f"got {value!r}")
        try:
            config = self.config_cls(**options)
        except (TypeError, ValueError) as exc:
            raise PropdError(f"bad options for {self.role} {self.name!r}: {exc}") from None
        return self.factory(config)


def _fits(value: Any, tp: Any) -> bool:
    """Whether an option value has the annotated type (int, float, str, bool, unions, tuples); other types pass."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(args) == len(value) and all(_fits(v, t) for v, t in zip(value, args))
    return True


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(t) for t in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])} values, e.g. [1,2]"
    return {int: "a whole number", float: "a number", str: "text", bool: "true or false",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("propd")
    pm.add_hookspecs(hookspecs)
    return pm


class Registry:
    """Named components by role, collected from built-ins, entry points and any extra plugin objects."""

    def __init__(self, extra_plugins: Iterable[Any] = (), entry_points: bool = True):
        import importlib

        pm = new_manager()
        for mod in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(mod), name=mod)
        if entry_points:
            pm.load_setuptools_entrypoints("propd")
        for plugin in extra_plugins:
            if pm.is_registered(plugin):
                continue
            pm.register(plugin)
        self._components: dict[tuple[str, str], Component] = {}
        pm.hook.propd_register_components(register=self._register)
        self.presets: dict[str, Any] = {}  # presets registered by plugins (the built-in ones: propd.presets.PRESETS)
        pm.hook.propd_register_presets(register=self._register_preset)

    def _register_preset(self, name: str, description: str, sizer: Any, proposer: Any = None, pruners: Any = (),
                         verifier: Any = ("greedy", {})) -> None:
        from propd.presets import AUTO, PRESETS, Preset, as_spec

        if name in PRESETS or name in self.presets or name == AUTO:
            raise PropdError(f"two plugins register a preset named {name!r}")
        self.presets[name] = Preset(name, description, sizer=as_spec(sizer), verifier=as_spec(verifier),
                                    proposer=None if proposer is None else as_spec(proposer),
                                    pruners=tuple(as_spec(p) for p in pruners))

    def _register(self, role: str, name: str, factory: Callable[[Any], Any], config_cls: type | None = None,
                  description: str = "") -> None:
        if role not in ROLES:
            raise PropdError(f"cannot register {name!r}: unknown role {role!r} (roles: {', '.join(ROLES)})")
        if (role, name) in self._components:
            raise PropdError(f"two plugins register a {role} named {name!r}")
        self._components[(role, name)] = Component(role, name, factory, config_cls, description)

    def get(self, role: str, name: str) -> Component:
        try:
            return self._components[(role, name)]
        except KeyError:
            known = ", ".join(self.names(role)) or "none"
            raise PropdError(f"unknown {role} {name!r} (known: {known})") from None

    def names(self, role: str) -> list[str]:
        return sorted(n for r, n in self._components if r == role)

    def all(self) -> list[Component]:
        return [self._components[k] for k in sorted(self._components, key=lambda k: (ROLES.index(k[0]), k[1]))]


def step_manager(chosen: list[tuple[str, Any]], observers: Sequence[Any] = ()) -> pluggy.PluginManager:
    """A fresh manager holding exactly the chosen (role, instance) pairs, checked for a well-formed pipeline, and the
    ``observers`` (lifecycle hooks only: ``propd.roles.observer_problem``)."""
    pm = new_manager()
    counts = {role: 0 for role in ROLES}
    from propd.roles import missing_hooks, observer_problem

    for role, obj in chosen:
        missing = missing_hooks(role, obj)
        if missing:
            raise PropdError(f"{type(obj).__name__} is registered as a {role} but does not implement "
                             f"{' and '.join(missing)} (propd.roles.{role.capitalize()})")
        pm.register(obj)
        counts[role] += 1
    for role in ("sizer", "verifier"):
        if counts[role] != 1:
            raise PropdError(f"a decoder needs exactly one {role}, got {counts[role]}")
    if counts["proposer"] > 1:
        raise PropdError(f"a decoder takes at most one proposer, got {counts['proposer']}")
    for obs in observers:
        problem = observer_problem(obs)
        if problem:
            raise PropdError(problem)
        pm.register(obs)
    return pm
