# The pump application: a data pump in the spirit of MetPX-Sarracenia sr3 (see
# ion/apps/pump/app.py). One consumer per subscription fetches the files announced on an
# exchange through the transfer service and reports each outcome to its source.
{
    'type': 'application',
    'name': 'pump',
    'description': 'Data pump: subscribe to v03 notices, fetch and verify files, report back',
    'version': '0.1',
    'mod': (
        'ion.apps.pump.app',
        [],
        {
            'subscriptions': [
                {
                    'name': 'pump',
                    'exchange': 'xpublic',
                    'topics': ['v03.#'],
                    'directory': 'pump/destination/',
                    'mirror': True,
                },
            ],
            'transfer': {'workers': 2},
        },
    ),
    'applications': ['ioncore'],
    'registered': [],
}
