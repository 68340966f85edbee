"""Stand-in for gradio: the few components the extension builds, recorded in `created`."""
created = []


class _Component:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        created.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class Blocks(_Component):
    pass


class Tab(_Component):
    pass


class HTML(_Component):
    @property
    def value(self):
        return self.args[0] if self.args else self.kwargs.get("value")


class Textbox(_Component):
    pass
