"""Plugins: pluggy hooks through which every adapter, built in or not, extends the server.

A plugin is any object (usually a module) with functions marked ``@hookimpl`` whose names
are the hooks below. It may take any subset of a hook's arguments, by name:

    # my_plugin.py
    from lightllm_plugin.plugins import hookimpl

    @hookimpl
    def register_routes(app, engine):
        @app.get("/hello")
        async def hello():
            return {"hello": "world"}

    # its pyproject.toml
    [project.entry-points.lightllm_plugin]
    my_plugin = "my_plugin"

Loading. The built-in plugins (``BUILTIN_PLUGINS``: the native API, the OpenAI routes,
the LangChain and LazyLLM adapters, the CLI commands, the model architectures) always load.
The LangChain and LazyLLM ones are light modules declaring their adapter through
``register_adapters``: loading them imports neither langchain_core nor lazyllm. Third-party plugins come from the
``lightllm_plugin`` entry-point group; ``LIGHTLLM_PLUGINS=name1,name2`` loads only those
(an empty value loads none). A plugin that fails to import, or whose hook raises, stops
the command with an error naming it (``PluginError``), unless broken plugins are to be
skipped (``--skip_broken_plugins`` or ``LIGHTLLM_PLUGINS_SKIP_BROKEN=1``): then a warning
names it and everything else goes on without it.

Hook order: pluggy's (the most recently registered first, ``tryfirst``/``trylast``
honoured); the built-in hooks are ``tryfirst``, so their routes and commands come first
and a third-party plugin cannot shadow them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

PROJECT = "lightllm_plugin"
ENTRY_POINT_GROUP = "lightllm_plugin"
ENV_PLUGINS = "LIGHTLLM_PLUGINS"
ENV_SKIP_BROKEN = "LIGHTLLM_PLUGINS_SKIP_BROKEN"
SKIP_BROKEN_FLAG = "--skip_broken_plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# name -> module; each module is a plugin (its @hookimpl functions)
BUILTIN_PLUGINS = {
    "cli": "lightllm_plugin.cli",
    "models": "lightllm_plugin.models.registry",
    "native": "lightllm_plugin.server.native",
    "openai": "lightllm_plugin.adapters.openai",
    "langchain": "lightllm_plugin.adapters.langchain_hooks",
    "lazyllm": "lightllm_plugin.adapters.lazyllm_hooks",
    "ray_serve": "lightllm_plugin.adapters.ray_serve_hooks",
}


class HookSpecs:
    """The hooks a plugin may implement."""

    @hookspec
    def register_routes(self, app, engine, config) -> None:
        """Add HTTP routes to the server's FastAPI ``app`` (called once, in the api process,
        before the server listens).

        ``engine`` is the server's ``AsyncEngineClient``: ``engine.generate(...)`` runs a
        request through the pipeline. ``config`` is the server's ``EngineConfig`` (also
        ``app.state.config``), with the model's resolved facts filled in. Routes are served
        behind ``--api_key`` like the built-in ones."""

    @hookspec
    def register_cli(self, cli) -> None:
        """Add subcommands to the ``lightllm-plugin`` command: ``cli.add_command(name, main,
        help)``, where ``main(argv: list[str]) -> int`` parses its own flags (``argv`` is
        what follows the command's name) and returns the exit code."""

    @hookspec
    def register_models(self, register) -> None:
        """Declare model architectures: ``register(architecture, model_class)``, where
        ``architecture`` is the name in a checkpoint's ``config.json`` ``architectures``
        (e.g. ``"LlamaForCausalLM"``). The loader (models/loader.py) builds the class of a
        checkpoint's architecture from this registry, as ``model_class(model_config, dtype)``
        on the meta device, and fills it from Llama-family checkpoint names (so a plugin's
        class is typically a ``LlamaFamilyModel`` subclass); an architecture nobody registered
        is refused with the registered ones listed. The first registration of a name wins, and
        the built-in ones come first."""


    @hookspec
    def register_adapters(self, register) -> None:
        """Declare a client-side adapter, one that runs in the user's program (LangChain model
        classes, a LazyLLM deploy method) rather than adding routes to the server:
        ``register(name, module, requires=(), extra=None, summary="")``. ``module`` is what
        users import; ``requires`` the distributions it needs, as requirement strings
        (``"langchain-core>=0.3"``); ``extra`` the ``lightllm-plugin[extra]`` that installs
        them (with no ``requires``, that extra's requirements in this package's metadata).
        Nothing is imported: ``lightllm-plugin plugins`` reports each adapter as available or
        not from the installed distributions' metadata, so an adapter whose library is heavy
        or missing costs the server nothing."""


class PluginError(RuntimeError):
    """A plugin failed to load or its hook raised; the message names the plugin."""

    def __init__(self, name: str, what: str, exc: BaseException):
        super().__init__(f"plugin {name!r} {what}: {type(exc).__name__}: {exc}")
        self.plugin = name


@dataclass
class PluginInfo:
    name: str
    source: str  # "builtin" or the distribution it came from
    version: str
    value: str  # the module (or object) it was loaded from
    hooks: list[str] = field(default_factory=list)


class PluginManager(pluggy.PluginManager):
    """pluggy's manager, knowing where each plugin came from and which ones were skipped."""

    def __init__(self, skip_broken: bool = False):
        super().__init__(PROJECT)
        self.add_hookspecs(HookSpecs)
        self.skip_broken = skip_broken
        self.infos: dict[str, PluginInfo] = {}
        self.broken: dict[str, str] = {}  # name -> error, for plugins that were skipped

    def add(self, plugin: Any, info: PluginInfo) -> None:
        self.register(plugin, name=info.name)
        info.hooks = sorted(c.name for c in self.get_hookcallers(plugin) or [])
        self.infos[info.name] = info

    def failed(self, error: PluginError) -> None:
        if not self.skip_broken:
            raise error
        self.broken[error.plugin] = str(error)
        print(f"lightllm-plugin: warning: {error}; skipped (broken plugins are skipped)", file=sys.stderr, flush=True)

    def call_each(self, hook: str, _before: Callable[[str], None] | None = None, **kwargs: Any) -> None:
        """Call every implementation of ``hook``, in pluggy's order; one that raises is
        reported by name (and skipped, and unregistered, when broken plugins are skipped)."""
        for impl in reversed(getattr(self.hook, hook).get_hookimpls()):
            if _before is not None:
                _before(impl.plugin_name)
            try:
                impl.function(*[kwargs[arg] for arg in impl.argnames])
            except Exception as exc:
                self.failed(PluginError(impl.plugin_name, f"failed in {hook}", exc))
                self.unregister(name=impl.plugin_name)
                self.infos.pop(impl.plugin_name, None)


def skip_broken_requested(argv: list[str] | None = None) -> bool:
    if argv is not None and SKIP_BROKEN_FLAG in argv:
        return True
    return os.environ.get(ENV_SKIP_BROKEN, "").strip().lower() in ("1", "true", "yes", "on")


def allowed_plugins() -> set[str] | None:
    """The third-party plugins LIGHTLLM_PLUGINS allows; None: all of them."""
    value = os.environ.get(ENV_PLUGINS)
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _version() -> str:
    try:
        return importlib.metadata.version("lightllm-plugin")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def load_plugins(skip_broken: bool | None = None, builtins: bool = True) -> PluginManager:
    """A manager with the built-in plugins (unless `builtins` is false: the model processes need
    only the third-party architectures) and the third-party ones allowed to load."""
    pm = PluginManager(skip_broken=skip_broken_requested() if skip_broken is None else skip_broken)
    own_version = _version()
    for name, module in BUILTIN_PLUGINS.items() if builtins else ():
        pm.add(importlib.import_module(module), PluginInfo(name, "builtin", own_version, module))
    allowed = allowed_plugins()
    seen: set[str] = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in seen or (allowed is not None and ep.name not in allowed):
            continue
        seen.add(ep.name)
        dist = getattr(ep, "dist", None)
        source = dist.metadata["Name"] if dist is not None else "unknown"
        version = dist.version if dist is not None else "unknown"
        try:
            if ep.name in pm.infos:
                raise ValueError(f"the name is taken by the {pm.infos[ep.name].source} plugin of that name")
            pm.add(ep.load(), PluginInfo(ep.name, source, version, ep.value))
        except Exception as exc:
            pm.failed(PluginError(ep.name, f"(entry point {ep.value!r} of {source} {version}) failed to load", exc))
    missing = (allowed or set()) - seen
    for name in sorted(missing):
        print(f"lightllm-plugin: warning: {ENV_PLUGINS} names {name!r}, which no installed package provides",
              file=sys.stderr, flush=True)
    return pm


# ---- what the hooks produce -------------------------------------------------------------
@dataclass
class Command:
    name: str
    main: Callable[[list[str]], int]
    help: str
    plugin: str


class CommandRegistry:
    """What ``register_cli`` receives."""

    def __init__(self):
        self.commands: dict[str, Command] = {}
        self.plugin = "?"  # set by collect_commands while each plugin's hook runs

    def add_command(self, name: str, main: Callable[[list[str]], int], help: str = "") -> None:
        if name in self.commands:
            raise ValueError(f"command {name!r} is already provided by plugin {self.commands[name].plugin!r}")
        self.commands[name] = Command(name, main, help, self.plugin)


def collect_commands(pm: PluginManager) -> dict[str, Command]:
    registry = CommandRegistry()
    pm.call_each("register_cli", lambda name: setattr(registry, "plugin", name), cli=registry)
    return registry.commands


class ModelRegistry:
    """What ``register_models`` fills: architecture name -> model class."""

    def __init__(self):
        self.architectures: dict[str, Any] = {}

    def __call__(self, architecture: str, model_class: Any) -> None:
        self.architectures.setdefault(architecture, model_class)


def collect_models(pm: PluginManager) -> dict[str, Any]:
    registry = ModelRegistry()
    pm.call_each("register_models", register=registry)
    return registry.architectures


@dataclass
class Adapter:
    """A client-side adapter declared through ``register_adapters``."""

    name: str
    module: str
    requires: tuple[str, ...] = ()
    extra: str | None = None
    summary: str = ""
    plugin: str = "?"

    def requirements(self) -> tuple[str, ...]:
        """`requires`, or when none were given, what this package's `extra` installs (read from
        its metadata, so pyproject.toml is the one place the versions are written)."""
        return self.requires or (extra_requirements(self.extra) if self.extra else ())

    def missing(self) -> list[str]:
        """The requirements not met by what is installed (read from metadata, nothing imported)."""
        return [req for req in self.requirements() if not _requirement_met(req)]

    @property
    def available(self) -> bool:
        return not self.missing()

    def status(self) -> str:
        missing = self.missing()
        if not missing:
            found = ", ".join(f"{_requirement_name(r)} {_installed_version(_requirement_name(r))}" for r in self.requirements())
            return f"available ({found})" if found else "available"
        hint = f"pip install 'lightllm-plugin[{self.extra}]'" if self.extra else "pip install " + " ".join(
            repr(r) for r in missing)
        parts = []
        for req in missing:
            version = _installed_version(_requirement_name(req))
            parts.append(req if version is None else f"{req} ({version} installed)")
        return f"unavailable: needs {', '.join(parts)} ({hint})"


DISTRIBUTION = "lightllm-plugin"


def extra_requirements(extra: str) -> tuple[str, ...]:
    """The requirements `pip install 'lightllm-plugin[extra]'` adds, from the installed metadata
    (none when the package runs uninstalled, from a source tree)."""
    try:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        return ()
    try:
        from packaging.requirements import Requirement  # transformers' dependency
    except ImportError:  # pragma: no cover
        return ()
    found = []
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and req.marker.evaluate({"extra": extra}) and not req.marker.evaluate({"extra": ""}):
            req.marker = None
            found.append(str(req))
    return tuple(found)


def _requirement_name(requirement: str) -> str:
    name = requirement.strip()
    for i, ch in enumerate(name):
        if not (ch.isalnum() or ch in "-_."):
            return name[:i]
    return name


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _requirement_met(requirement: str) -> bool:
    version = _installed_version(_requirement_name(requirement))
    if version is None:
        return False
    try:
        from packaging.requirements import Requirement  # transformers' dependency
    except ImportError:  # pragma: no cover - without packaging, any installed version does
        return True
    return Requirement(requirement).specifier.contains(version, prereleases=True)


class AdapterRegistry:
    """What ``register_adapters`` receives."""

    def __init__(self):
        self.adapters: dict[str, Adapter] = {}
        self.plugin = "?"  # set by collect_adapters while each plugin's hook runs

    def __call__(self, name: str, module: str, requires=(), extra: str | None = None, summary: str = "") -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already declared by plugin {self.adapters[name].plugin!r}")
        self.adapters[name] = Adapter(name, module, tuple(requires), extra, summary, self.plugin)


def collect_adapters(pm: PluginManager) -> dict[str, Adapter]:
    registry = AdapterRegistry()
    pm.call_each("register_adapters", lambda name: setattr(registry, "plugin", name), register=registry)
    return registry.adapters
