"""Starts the hello app: a supervisor over C{instances} HelloService processes."""

from ion.core.process import Supervisor


async def start(container, app, instances=1):
    children = [{"id": f"hello{i}", "spec": "ion.apps.hello.service"} for i in range(instances)]
    return await container.spawn(Supervisor, name=f"{app.name}-sup", args={"children": children})
