# The hello application: a learning example (see ion/apps/hello/__init__.py).
{
    'type': 'application',
    'name': 'hello',
    'description': 'Greets whoever calls op hello on service hello',
    'version': '0.1',
    'mod': ('ion.apps.hello.app', [], {'instances': 1}),
    'applications': ['ioncore'],
    'registered': ['hello'],
    'config': {'ion.apps.hello': {'greeting': 'Hello'}},
}
