"""The hello service: one op that greets whoever calls it."""

from ion.core.process import ApplicationError, ServiceProcess


class HelloService(ServiceProcess):
    """Answers C{hello} with a greeting; the greeting comes from config C{ion.apps.hello}."""

    service = "hello"

    def op_hello(self, content, headers):
        if not isinstance(content, str):
            raise ApplicationError(f"hello wants a name (a string), got {type(content).__name__}")
        greeting = self.config("greeting", "Hello", module="ion.apps.hello")
        return f"{greeting}, {content}! (from {self.pid})"


process_class = HelloService
