# The core application every container runs first: the container's own process (ops ping, ps).
{
    'type': 'application',
    'name': 'ioncore',
    'description': 'ION core services of a container',
    'version': '0.1',
    'mod': ('ion.core.cc.coreapp', [], {}),
    'applications': [],
    'registered': [],
}
