"""YAML -> typed values: reading files, ``--set`` overrides, pluggable sections and dataclasses.

A pluggable section (``data``, ``scenario``, ``model``, ``strategy``) is a constructor call:
``{name: ewc, lambda: 100}`` is checked against the keyword-only parameters of the factory
registered as ``ewc`` (``lambda`` maps to ``lambda_``, since it is a Python keyword) and later
called as ``EWC(lambda_=100)``. Positional parameters of a factory are what clsim itself
supplies (the source, the seed, the input shape) and never come from YAML. Every problem is a
:class:`~clsim.errors.ConfigError` naming the key path and what was expected.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import hashlib
import importlib.util
import inspect
import keyword
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from clsim.config.schema import Section, _yaml_key
from clsim.errors import ConfigError, did_you_mean
from clsim.registry import Registry


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in ``path``; a ConfigError naming the file otherwise.

    The file is decoded as UTF-8 (YAML 1.2's default encoding) whatever the locale, so a config
    reads the same on every machine, and a binary file is a one-line error, not a traceback.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the config file: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), f"not a text file (UTF-8): byte 0x{exc.object[exc.start]:02x} at offset "
                                     f"{exc.start} is not UTF-8; an experiment file is YAML text")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        position = getattr(exc, "position", None)  # a ReaderError (e.g. a NUL byte) has no mark
        where = f" at line {mark.line + 1}" if mark else f" at character {position}" if position is not None else ""
        # str(exc) spans several lines; the CLI prints one.
        problem = " ".join(str(getattr(exc, "problem", None) or getattr(exc, "reason", None) or exc).split())
        raise ConfigError(str(path), f"not valid YAML{where}: {problem}")
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "expected a YAML mapping of sections at the top level")
    return raw


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item}", "expected KEY=VALUE, e.g. train.epochs=3")
    dotted, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(dotted, f"cannot parse override value {text!r}")
    keys = dotted.strip().split(".")
    node = raw
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(keys[: i + 1]), "is not a section, cannot set a key in it")
        node = child
    node[keys[-1]] = value


def parse_section(
    key: str, raw: Any, registry: Registry, base_dir: Path | None = None
) -> Section:
    """A pluggable section: ``{name: NAME, ...kwargs}`` or ``{plugin: FILE.py:Class, ...}``."""
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(key, f"expected a mapping with a 'name', got {_kind(raw)}")
    raw = dict(raw)
    plugin = raw.pop("plugin", None)
    if plugin is not None and "name" in raw and _takes_plugin_kwarg(registry, raw["name"]):
        raw["plugin"], plugin = plugin, None  # the factory's own argument (e.g. avalanche's plugin class)
    if plugin is not None and "name" in raw:
        raise ConfigError(f"{key}.plugin", f"give either 'name' or 'plugin', not both (name: {raw['name']!r}); "
                                           f"to swap in a plugin from the command line, set the whole section: "
                                           f"--set '{key}={{plugin: FILE.py:Class}}'")
    if plugin is not None:
        factory, plugin = load_plugin(plugin, f"{key}.plugin", base_dir), _resolve_plugin(plugin, base_dir)
        name = factory.__name__.lower()
    elif "name" in raw:
        name = check_value(raw.pop("name"), str, f"{key}.name")
        factory = registry.get(name, path=f"{key}.name")
    else:
        raise ConfigError(f"{key}.name", f"missing; one of: {', '.join(registry.names())}")
    kwargs = check_kwargs(key, factory, raw)
    return Section(key=key, name=name, factory=factory, kwargs=kwargs, plugin=plugin)


def _takes_plugin_kwarg(registry: Registry, name: Any) -> bool:
    """Whether the factory registered as ``name`` has a keyword-only ``plugin`` argument of its
    own (then ``plugin:`` next to ``name:`` is that argument, not a plugin file)."""
    if not isinstance(name, str) or name not in registry:
        return False
    return "plugin" in config_parameters(registry.get(name))


def check_kwargs(key: str, factory: Any, raw: dict[str, Any]) -> dict[str, Any]:
    """Check ``raw`` against ``factory``'s keyword-only parameters; return Python kwargs.

    A factory with ``**kwargs`` receives the keys it does not name as they are and checks them
    itself (e.g. the ``avalanche`` strategy forwards them to an Avalanche plugin's constructor).
    """
    params = config_parameters(factory)
    hints = _type_hints(factory)
    known = {_yaml_key(p) for p in params}
    open_ended = _takes_var_kwargs(factory)
    kwargs = {}
    for yaml_key, value in raw.items():
        path = f"{key}.{yaml_key}"
        if yaml_key not in known and open_ended:
            kwargs[yaml_key] = value
            continue
        if yaml_key not in known:
            raise ConfigError(path, f"unknown key{did_you_mean(str(yaml_key), known)}; known: "
                              f"{', '.join(sorted(known)) or 'none'}")
        param = _python_key(yaml_key)
        kwargs[param] = check_value(value, hints.get(param, Any), path)
    missing = [p for p, spec in params.items() if spec.default is inspect.Parameter.empty and p not in kwargs]
    if missing:
        raise ConfigError(f"{key}.{_yaml_key(missing[0])}", "required key is missing")
    # Record every default too: config.yaml then reruns the same experiment even if a
    # factory's defaults change later.
    defaults = {p: copy.deepcopy(spec.default) for p, spec in params.items() if p not in kwargs}
    return defaults | kwargs


def config_parameters(factory: Any) -> dict[str, inspect.Parameter]:
    """The keyword-only parameters of ``factory``: the keys its YAML section may hold."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    sig = inspect.signature(target)
    return {n: p for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _takes_var_kwargs(factory: Any) -> bool:
    # signature(cls), not cls.__init__: a class without its own __init__ has object's (*args, **kwargs)
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())


def parse_dataclass(key: str, raw: Any, cls: type) -> Any:
    """A fixed section: ``raw`` checked against the fields of dataclass ``cls``."""
    if not isinstance(raw, dict):
        raise ConfigError(key, f"expected a mapping, got {_kind(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    _reject_unknown(key, raw, fields)
    return cls(**{k: check_value(v, hints[k], f"{key}.{k}") for k, v in raw.items()})


def check_value(value: Any, annotation: Any, path: str) -> Any:
    """``value`` if it fits ``annotation`` (ints widen to floats); a ConfigError otherwise."""
    ok, result = _fit(value, annotation)
    if not ok:
        raise ConfigError(path, f"expected {_describe(annotation)}, got {_kind(value)} {value!r}")
    return result


def _fit(value: Any, ann: Any) -> tuple[bool, Any]:
    if ann is Any or ann is inspect.Parameter.empty:
        return True, value
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (Union, types.UnionType):
        for arg in args:
            ok, result = _fit(value, arg)
            if ok:
                return True, result
        return False, value
    if origin is Literal:
        return value in args, value
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False, value
        inner = args[0] if args else Any
        fitted = [_fit(v, inner) for v in value]
        return all(ok for ok, _ in fitted), [v for _, v in fitted]
    if origin is dict or ann is dict:
        return isinstance(value, dict), value
    if ann is type(None):
        return value is None, value
    if ann is bool:
        return isinstance(value, bool), value
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if ann is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if ann is str:
        return isinstance(value, str), value
    if inspect.isclass(ann):
        return isinstance(value, ann), value
    return True, value


def _describe(ann: Any) -> str:
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple) or (origin and "Sequence" in str(origin)):
        return f"a list of {_describe(args[0]) if args else 'values'}"
    names = {int: "an int", float: "a number", bool: "true or false", str: "a string",
             type(None): "null", dict: "a mapping"}
    return names.get(ann, getattr(ann, "__name__", str(ann)))


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an int", float: "a number", str: "a string",
            list: "a list", dict: "a mapping", type(None): "null"}.get(type(value), type(value).__name__)


def _reject_unknown(prefix: str, raw: dict, known: Any) -> None:
    for key in raw:
        if key not in known:
            path = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(path, f"unknown key{did_you_mean(str(key), known)}; known: {', '.join(known)}")


def _python_key(key: str) -> str:
    return f"{key}_" if keyword.iskeyword(key) else key


def _type_hints(factory: Any) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        return typing.get_type_hints(target)
    except Exception:  # unresolvable forward references in a plugin: skip type checks
        return {}


def _resolve_plugin(spec: str, base_dir: Path | None) -> str:
    file, _, attr = spec.rpartition(":")
    return f"{_find_plugin_file(file, base_dir) or file}:{attr}"


def _find_plugin_file(file: str, base_dir: Path | None) -> Path | None:
    for root in (Path.cwd(), base_dir, base_dir.parent if base_dir else None):
        if root is not None and (root / file).is_file():
            return (root / file).resolve()
    return None


def load_plugin(spec: Any, path: str, base_dir: Path | None = None) -> Any:
    """Load ``FILE.py:Attr`` (relative to the working directory or the config's folder)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(path, f"expected 'path/to/file.py:ClassName', got {spec!r}")
    file, _, attr = spec.rpartition(":")
    found = _find_plugin_file(file, base_dir)
    if found is None:
        raise ConfigError(path, f"plugin file '{file}' not found (looked in the working "
                                f"directory and next to the config)")
    # stable across processes (unlike hash()), so worker processes name the module alike
    module_name = f"clsim_plugin_{found.stem}_{hashlib.sha1(str(found).encode()).hexdigest()[:12]}"
    module = sys.modules.get(module_name)
    if module is None:
        spec_obj = importlib.util.spec_from_file_location(module_name, found)
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[module_name] = module
        try:
            spec_obj.loader.exec_module(module)
        except (ImportError, SyntaxError) as exc:  # the user's file or its environment: exit 2
            del sys.modules[module_name]
            line = f", line {exc.lineno}" if isinstance(exc, SyntaxError) else ""
            raise ConfigError(path, f"'{file}' failed to import{line}: {type(exc).__name__}: {exc}") from exc
        except BaseException:  # a bug in the plugin: keep its traceback, but not a half-loaded module
            del sys.modules[module_name]
            raise
    if not hasattr(module, attr):
        names = [n for n in vars(module) if not n.startswith("_")]
        raise ConfigError(path, f"'{file}' defines no '{attr}'{did_you_mean(attr, names)}")
    return getattr(module, attr)
