"""observer: watches all traffic of a system and draws it as message sequence charts.

Start it with `twistd -n cc res/apps/observer.app` (or `start_app('res/apps/observer.app')` in a
running container's shell). The Observer (service `observer`) reads the trace exchange
`ion.<sysname>.trace` and keeps the headers of the last messages (`ion.apps.observer: {'keep':
10000}`); it never sees contents, only their type and size. Ask it for a chart with
`rpc('observer', 'msc', {'conv_id': ...})` or `{'last': 20}`, for an SVG file with op `svg`
(add `'path': 'chart.svg'`), or for a list of conversations with op `conversations`.

Only traced sends are seen. The app turns tracing on in its own container; turn it on for the
other containers of the system with `-D ion.core.messaging:trace=True` (or
`'ion.core.messaging': {'trace': True}` in their res/config/ionlocal.config).
"""
