"""Starting and stopping applications in dependency order.

C{AppController.start_files([...])} reads every .app/.rel given (and, by name from res/apps, the
apps they depend on), checks them all, and only then starts the apps, dependencies first
(C{graphlib}); C{stop_all()} stops them in reverse. An app module offers
C{start(container, app, **kwargs)} returning its state (usually its top process, or an awaitable
of it) and optionally C{stop(container, state)}; without C{stop}, the state's C{terminate()} is
awaited. An app whose top process ends FAILED (its supervisor gave up) is logged as failed and
dropped from C{running}; the other apps keep running.

Per-app kwargs: the C{mod} kwargs of the .app < C{args} of the .rel entry < C{apparg_<app>} given
on the command line. App C{config} and then rel entry C{config} are layered into the live config
before the app starts.
"""

import graphlib
import importlib
import inspect

import attrs

from twisted.logger import Logger

from ion.core.app.appfile import AppFileError, find_file, read_app, read_rel
from ion.core.process.lifecycle import FAILED
from ion.core.process.process import Process

log = Logger()


@attrs.define
class RunningApp:
    spec: object
    module: object
    state: object

    @property
    def name(self):
        return self.spec.name


class AppController:
    """The apps of one container."""

    def __init__(self, container, apparg=None):
        self.container = container
        self.apparg = dict(apparg or {})
        self.running = {}

    def plan(self, files):
        """Read and check files (and dependencies); returns [(AppSpec, kwargs, config layers)]
        in start order, leaving out apps already running. Raises AppFileError."""
        res_dir = self.container.res_dir
        wanted = {}  # name -> (spec, rel entry or None)
        for item in files:
            if item.endswith(".rel"):
                rel = read_rel(find_file(item, res_dir, "rel"))
                for entry in rel.apps:
                    spec = read_app(find_file(entry.name, res_dir, "app"))
                    wanted[spec.name] = (spec, entry)
            else:
                spec = read_app(find_file(item, res_dir, "app"))
                wanted[spec.name] = (spec, wanted.get(spec.name, (None, None))[1])
        graph = {}
        todo = list(wanted)
        while todo:
            name = todo.pop()
            spec = wanted[name][0]
            graph[name] = set(spec.applications)
            for dep in spec.applications:
                if dep not in wanted and dep not in self.running:
                    try:
                        path = find_file(dep, res_dir, "app")
                    except AppFileError:
                        raise AppFileError(
                            f"{spec.path}: key 'applications' names {dep!r}, "
                            f"but there is no {res_dir}/apps/{dep}.app"
                        ) from None
                    wanted[dep] = (read_app(path), None)
                    todo.append(dep)
        try:
            order = list(graphlib.TopologicalSorter(graph).static_order())
        except graphlib.CycleError as e:
            cycle = " -> ".join(e.args[1])
            raise AppFileError(f"{wanted[e.args[1][0]][0].path}: dependency cycle {cycle}") from None
        self._check_registered([spec for spec, _ in wanted.values()])
        plan = []
        for name in order:
            if name in self.running or name not in wanted:
                continue
            spec, entry = wanted[name]
            try:
                importlib.import_module(spec.module)
            except ImportError as e:
                raise AppFileError(f"{spec.path}: key 'mod': cannot import {spec.module!r}: {e}")
            kwargs = dict(spec.kwargs)
            layers = [(f"app {name}", spec.config)]
            if entry is not None:
                kwargs.update(entry.args)
                layers.append((f"rel entry {name}", entry.config))
            apparg = self.apparg.get(name, {})
            if not isinstance(apparg, dict):
                raise AppFileError(f"apparg_{name}: must be a dict literal, got {apparg!r}")
            kwargs.update(apparg)
            mult = entry.mult if entry is not None else 1
            plan.append((spec, kwargs, layers, mult))
        return plan

    def _check_registered(self, specs):
        owner = {}
        for app in self.running.values():
            for reg in app.spec.registered:
                owner[reg] = app.spec
        for spec in specs:
            for reg in spec.registered:
                if reg in owner and owner[reg].name != spec.name:
                    raise AppFileError(
                        f"{spec.path}: key 'registered': {reg!r} is already registered by "
                        f"app {owner[reg].name!r} ({owner[reg].path})"
                    )
                owner[reg] = spec

    async def start_files(self, files):
        """Check everything, then start the apps in dependency order."""
        for spec, kwargs, layers, mult in self.plan(files):
            for name, layer in layers:
                if layer:
                    self.container.config.add_layer(name, layer)
            for copy in range(1, mult + 1):
                # A rel entry with mult: N runs N copies: hello, hello.2, ... hello.N. Each
                # copy's start() is given its own name as the app's, to keep its state apart.
                run_name = spec.name if copy == 1 else f"{spec.name}.{copy}"
                await self._start(attrs.evolve(spec, name=run_name), kwargs, run_name)

    async def _start(self, spec, kwargs, run_name):
        module = importlib.import_module(spec.module)
        state = module.start(self.container, spec, *spec.args, **kwargs)
        if inspect.isawaitable(state):
            state = await state
        self.running[run_name] = RunningApp(spec, module, state)
        if isinstance(state, Process):
            state.add_exit_observer(lambda proc: self._top_process_exited(run_name, proc))
        log.info("started app {name} {version}", name=run_name, version=spec.version)

    def _top_process_exited(self, name, proc):
        """An app whose top process (its supervisor) fails is no longer running; the other
        apps carry on."""
        app = self.running.get(name)
        if app is None or app.state is not proc or proc.state != FAILED:
            return
        del self.running[name]
        log.error("app {name} failed: its top process {proc!r} ended FAILED", name=name, proc=proc)

    async def stop(self, name):
        app = self.running.pop(name)
        stop = getattr(app.module, "stop", None)
        result = None
        if stop is not None:
            result = stop(self.container, app.state)
        elif hasattr(app.state, "terminate") and not app.state.lifecycle.final:
            result = app.state.terminate()
        if inspect.isawaitable(result):
            await result
        log.info("stopped app {name}", name=name)

    async def stop_all(self):
        for name in reversed(list(self.running)):
            try:
                await self.stop(name)
            except Exception:
                log.failure("app {name} failed to stop", name=name)
