"""The ``subjectpairs`` command line: ``app`` and its commands, one module per command or group; each parses
its flags, builds the typed configuration, calls the library and prints. Heavy imports (torch, Ray,
FiftyOne) stay inside the command functions."""

from __future__ import annotations

import typer

from subjectpairs import __version__
from subjectpairs.cli.backgrounds import backgrounds_command
from subjectpairs.cli.build import build_command
from subjectpairs.cli.common import console
from subjectpairs.cli.demo import demo_command
from subjectpairs.cli.edit import edit_command
from subjectpairs.cli.evaluate import evaluate_command, finetune_command
from subjectpairs.cli.filter import filter_command
from subjectpairs.cli.generate import generate_command, interpolate_command
from subjectpairs.cli.pair import pair_command
from subjectpairs.cli.pretrain import pretrain_qformer_command
from subjectpairs.cli.review import review_app
from subjectpairs.cli.shards import shards_app
from subjectpairs.cli.train import export_command, latents_command, train_command

app = typer.Typer(
    help="Rebuild the BLIP-Diffusion subject-pair corpus from OpenImages-V6 and train on it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def version_command() -> None:
    """Print the version."""
    console.print(__version__)


# the order of the top-level help; typer lists the groups after the commands
app.command("filter")(filter_command)
app.command("pair")(pair_command)
app.command("build")(build_command)
app.command("pretrain-qformer")(pretrain_qformer_command)
app.command("train")(train_command)
app.command("export")(export_command)
app.command("generate")(generate_command)
app.command("interpolate")(interpolate_command)
app.command("edit")(edit_command)
app.command("finetune")(finetune_command)
app.command("evaluate")(evaluate_command)
app.command("latents")(latents_command)
app.command("backgrounds")(backgrounds_command)
app.command("demo")(demo_command)
app.command("version")(version_command)
app.add_typer(shards_app, name="shards")
app.add_typer(review_app, name="review")
