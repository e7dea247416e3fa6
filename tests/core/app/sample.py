"""An app module for the controller tests: records starts and stops in `events`."""

events = []


def start(container, app, tag, **kwargs):
    events.append(("start", tag))
    return {"tag": tag, "app": app.name, "kwargs": dict(kwargs, tag=tag)}


def stop(container, state):
    events.append(("stop", state["tag"]))
