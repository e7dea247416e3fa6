"""hello: the smallest complete ION application, to read before writing your own.

A short tour, in the order things happen when you run C{twistd -n cc res/apps/hello.app}:

  1. C{res/apps/hello.app} is a Python literal naming the app, the module that starts it
     (C{mod}: L{ion.apps.hello.app} with kwargs C{{'instances': 1}}), the apps it needs first
     (C{ioncore}), the names it registers and the config it layers in
     (C{ion.apps.hello: {'greeting': 'Hello'}}).
  2. The container imports L{ion.apps.hello.app} and calls C{start(container, app, instances=1)}.
     It spawns a C{Supervisor} whose children are C{instances} copies of C{HelloService}.
  3. C{HelloService} (in C{service.py}) is a C{ServiceProcess} with C{service = 'hello'}: every
     instance consumes the shared queue of service C{hello}, so requests are spread over them.
  4. Any process (or the shell: C{rpc('hello', 'hello', 'Hi')}) calls the op; the method
     C{op_hello(content, headers)} returns the reply. The greeting comes from config, looked up
     each time, so C{-D ion.apps.hello:greeting=Bonjour} on the command line changes it.
  5. Errors are data: C{rpc('hello', 'hello', 42)} gets a 400 C{ApplicationError} back.
"""
