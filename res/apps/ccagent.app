# The container agent: announces this container, heartbeats, keeps the system's peer table,
# spawns processes on request (see ion/core/cc/agent.py). Started with the core app.
{
    'type': 'application',
    'name': 'ccagent',
    'description': 'Container agent: peers, heartbeats, remote spawn',
    'version': '0.1',
    'mod': ('ion.core.cc.agent', [], {}),
    'applications': ['ioncore'],
    'registered': ['ccagent'],
}
