"""Starts the observer app: turns tracing on in this container and spawns the Observer."""

from ion.apps.observer.observer import Observer

MESSAGING = "ion.core.messaging"
LAYER = "observer"


async def start(container, app):
    container.config.add_layer(LAYER, {MESSAGING: {"trace": True}})
    try:
        return await container.spawn(Observer)
    except BaseException:
        _restore_trace(container.config)
        raise


async def stop(container, observer):
    """Terminate the Observer and set tracing back to what it was before the app started."""
    try:
        if not observer.lifecycle.final:
            await observer.terminate()
    finally:
        _restore_trace(container.config)


def _restore_trace(config):
    # Config layers cannot be removed: add one on top holding the value that the other layers
    # (those not added by this app) give.
    trace = False
    for name, layer in reversed(config.layers):
        section = layer.get(MESSAGING)
        if name != LAYER and section is not None and "trace" in section:
            trace = section["trace"]
            break
    config.add_layer(LAYER, {MESSAGING: {"trace": trace}})
