"""The `dlrun` command's entry point: what needs no torch is answered here, the rest by dlrun.cli.

Importing dlrun.cli imports torch and every trainer (seconds). A renamed key and `--help` are
answered before that, from Hydra's compose API alone (a test checks that torch stays unimported).
"""

import os
import sys
from collections.abc import Sequence

import yaml
from hydra._internal.utils import get_args_parser
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from dlrun.config.explain import error_line
from dlrun.config.helptext import help_text
from dlrun.config.migrations import renamed_key
from dlrun.errors import UserError

HELP_FLAGS = ("--help", "-h")
# dlrun's own flag: every key, the blocks this config does not read too. Hydra's parser does not
# know it, so it is taken out of the arguments before Hydra sees them.
HELP_ALL = "--help-all"


def main() -> None:
    """`dlrun`: every failure ends as one paragraph and its exit code (2 for a user's mistake)."""
    args = sys.argv[1:]
    renamed = renamed_key(args)
    if renamed:
        print(f"dlrun: error: {renamed}", file=sys.stderr)
        sys.exit(UserError.exit_code)
    everything = HELP_ALL in args
    if everything:  # Hydra's own help (--config-dir ...) prints every key anyway
        args = [arg for arg in args if arg != HELP_ALL] + ["--help"]
        sys.argv = [sys.argv[0], *args]
    try:
        if any(arg in HELP_FLAGS for arg in args) and fast_help(args, everything):
            return
    except BrokenPipeError:  # `dlrun --help | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return
    from dlrun.cli import main as run  # torch, the trainers, @hydra.main: the run itself

    run()


def fast_help(args: Sequence[str], everything: bool = False) -> bool:
    """Print the help for these overrides (the keys their config reads; `everything`: every key);
    False (nothing printed) when a flag that changes which configs are read (--config-dir,
    --config-name, --config-path) calls for Hydra's own help."""
    parsed = get_args_parser().parse_args(list(args))  # Hydra's flags, Hydra's usage errors
    if parsed.config_dir or parsed.config_path or parsed.config_name:
        return False
    try:
        text = help_text(parsed.overrides, resolve=parsed.resolve, everything=everything)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # as dlrun.cli: the user asked for it
            raise
        print(error_line(err, parsed.overrides), file=sys.stderr)
        sys.exit(UserError.exit_code)
    print(text)
    return True
