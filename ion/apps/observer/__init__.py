"""observer: watches all traffic of a system and draws it as message sequence charts.

Start it with C{twistd -n cc res/apps/observer.app} (or C{start_app('res/apps/observer.app')} in a
running container's shell). The Observer (service C{observer}) reads the trace exchange
C{ion.<sysname>.trace} and keeps the headers of the last messages (C{ion.apps.observer: {'keep':
10000}}); it never sees contents, only their type and size. Ask it for a chart with
C{rpc('observer', 'msc', {'conv_id': ...})} or C{{'last': 20}}, for an SVG file with op C{svg}
(add C{'path': 'chart.svg'}), or for a list of conversations with op C{conversations}.

Only traced sends are seen. The app turns tracing on in its own container; turn it on for the
other containers of the system with C{-D ion.core.messaging:trace=True} (or
C{'ion.core.messaging': {'trace': True}} in their res/config/ionlocal.config).
"""
