"""Commands the model stages add to the ``seedline`` CLI (entry point ``seedline.commands``): ``export``."""

from __future__ import annotations

import typer

from pipeline.errors import ConfigError, SeedlineError


def export_gguf(
    run_dir: str = typer.Argument(..., help="the run directory (<workdir>/<name>)"),
    stage: str | None = typer.Option(None, "--stage", help="the stage whose model/ to export "
                                     "(default: the last stage of the run with a model)"),
    out: str | None = typer.Option(None, "--out", help="the GGUF file (default: <stage dir>/model.gguf)"),
    file_type: str = typer.Option("f32", "--type", help="weights: f32 (exact) or f16 (half the size)"),
) -> None:
    """Write a stage's model as a GGUF file (llama.cpp, Ollama; transformers loads it with gguf_file=)."""
    from pipeline.cli import _fail
    from stages.lm.gguf_export import FILE_TYPES, export_run_gguf

    try:
        if file_type not in FILE_TYPES:
            raise ConfigError("--type", f"{file_type!r} is not one of {', '.join(FILE_TYPES)}")
        typer.echo(export_run_gguf(run_dir, stage, out, file_type))
    except (SeedlineError, FileNotFoundError, ValueError) as e:
        _fail(e)


def register(app: typer.Typer) -> None:
    """Add ``seedline export gguf``."""
    export_app = typer.Typer(no_args_is_help=True, help="Write a stage's model in another format.")
    export_app.command("gguf")(export_gguf)
    app.add_typer(export_app, name="export")
