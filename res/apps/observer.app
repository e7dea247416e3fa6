# The observer application: message sequence charts of a system's traffic
# (see ion/apps/observer/__init__.py).
{
    'type': 'application',
    'name': 'observer',
    'description': 'Records the traced traffic of the system and draws message sequence charts',
    'version': '0.1',
    'mod': ('ion.apps.observer.app', [], {}),
    'applications': ['ioncore'],
    'registered': ['observer'],
    'config': {'ion.apps.observer': {'keep': 10000}},
}
