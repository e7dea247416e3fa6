"""hello: the smallest complete ION application, to read before writing your own.

A short tour, in the order things happen when you run `twistd -n cc res/apps/hello.app`:

1. `res/apps/hello.app` is a Python literal naming the app, the module that starts it
   (`mod`: `ion.apps.hello.app` with kwargs `{'instances': 1}`), the apps it needs first
   (`ioncore`), the names it registers and the config it layers in
   (`ion.apps.hello: {'greeting': 'Hello'}`).
2. The container imports `ion.apps.hello.app` and calls `start(container, app, instances=1)`.
   It spawns a `Supervisor` whose children are `instances` copies of `HelloService`.
3. `HelloService` (in `service.py`) is a `ServiceProcess` with `service = 'hello'`: every instance
   consumes the shared queue of service `hello`, so requests are spread over them.
4. Any process (or the shell: `rpc('hello', 'hello', 'Hi')`) calls the op; the method
   `op_hello(content, headers)` returns the reply. The greeting comes from config, looked up
   each time, so `-D ion.apps.hello:greeting=Bonjour` on the command line changes it.
5. Errors are data: `rpc('hello', 'hello', 42)` gets a 400 `ApplicationError` back.
"""
