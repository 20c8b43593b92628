"""A third-party lightllm-plugin plugin: one route, one CLI command, one architecture."""

from lightllm_plugin.plugins import hookimpl


@hookimpl
def register_routes(app, engine, config):
    @app.get("/sample/hello")
    async def hello():
        return {"hello": "from sample", "model": config.served_model_name or config.model_dir,
                "engine": type(engine).__name__}


def _hello_main(argv):
    print("sample says hello " + " ".join(argv))
    return 0


@hookimpl
def register_cli(cli):
    cli.add_command("sample-hello", _hello_main, "say hello (from the sample plugin)")


@hookimpl
def register_models(register):
    register("SampleForCausalLM", object)
