"""The OpenAI-compatible HTTP server over AsyncLLM (see app.py): `create_app(engine, cfg)` and
`run_server(cfg)`. Imported lazily so that `import ember.server` alone pulls in nothing heavy."""


def __getattr__(name):
    if name in ("create_app", "run_server", "build_server"):
        from ember.server import app

        return getattr(app, name)
    raise AttributeError(name)
