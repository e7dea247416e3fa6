# The pump application: a data pump in the spirit of MetPX-Sarracenia sr3 (see
# ion/apps/pump/app.py for every kwarg). Out of the box, run from any working directory:
# files dropped into pump/source/ are announced (poll), passed to xpublic (ingest), fetched
# and verified into pump/destination/ with the same tree (consumer), and each outcome is
# reported; the report router writes every report as a JSON line to var/pump/reports.jsonl.
# State (seen files, duplicate caches, retry queues) lives under var/pump/.
#
# Override any kwarg on the command line, e.g.
#   twistd -n cc -a "{'apparg_pump': {'polls': [{'name': 'src', 'url': 'file:/data/in/'}]}}" pump
{
    'type': 'application',
    'name': 'pump',
    'description': 'Data pump: poll sources, announce v03 notices, fetch and verify files, report',
    'version': '0.2',
    'mod': (
        'ion.apps.pump.app',
        [],
        {
            'polls': [
                {
                    'name': 'source',
                    'url': 'file:pump/source/',
                    'interval': 2,
                    # Files modified within the last second may still be being written.
                    'min_age': 1,
                    # The pump's own source is created if missing (another poll's is not).
                    'create': True,
                },
            ],
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
            'report_router': {'log_path': 'var/pump/reports.jsonl'},
            'progress': {'interval': 10},
        },
    ),
    'applications': ['ioncore'],
    'registered': [],
    # The web console (ion.core.cc.web) on loopback; if that port is taken, the pump runs
    # without it. --web [ADDRESS:]PORT chooses another; -D ion.core.cc:web=None turns it off.
    'config': {'ion.core.cc': {'web': '127.0.0.1:8580'}},
}
