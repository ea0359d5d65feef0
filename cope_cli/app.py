"""The `cope` command line."""

import typer

app = typer.Typer(help="Contextual Position Encoding experiments.", no_args_is_help=True)


@app.command()
def recipes() -> None:
    """List recipes."""


def main() -> None:
    app()
