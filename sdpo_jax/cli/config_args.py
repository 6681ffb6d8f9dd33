"""The command line of sdpo-train and sdpo-plan: `--config PATH[:ARG]` (an ml_collections config
file, absl config_flags style), `--config.FIELD=VALUE` overrides and the command's own flags, read
without tracebacks.

Reading happens in three steps so that each mistake is told in one line naming what is wrong:
the config file (its get_config runs once; a missing file or an error inside it), then the names of
the overrides against that config's fields (a misspelt field is named with the nearest valid one),
then the overrides with config_flags' own value parsing (a value of the wrong type names the flag).
Any of them raises `ConfigError`; `-h`/`--help` prints the command's help and exits 0.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

from absl import flags
from ml_collections import config_flags

from sdpo_jax.config_check import flat_fields, unknown_field_message
from sdpo_jax.errors import ConfigError

HELP_ARGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")
_CONFIG_SPEC = re.compile(r"^--?config(=|$)")
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")


def wants_help(argv: list[str]) -> bool:
    return any(arg in HELP_ARGS for arg in argv[1:])


def parse_command_line(
    argv: list[str], default_config: str, define_flags: Callable[[flags.FlagValues], None]
) -> tuple[object, flags.FlagValues]:
    """(the config with its overrides applied, the parsed FlagValues of ``define_flags``' flags)."""
    spec, rest = _split_config_spec(argv)
    config = _load(spec or default_config)
    fields = flat_fields(config)
    sections = {name.rsplit(".", i)[0] for name in fields for i in range(1, name.count(".") + 1)}
    for arg in rest[1:]:
        match = _OVERRIDE.match(arg)
        if match and match.group(1) not in fields and match.group(1) not in sections:
            raise ConfigError(unknown_field_message(match.group(1), where=f"{arg}: "))
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    config_flags.DEFINE_config_dict(
        "config", config, "the config (--config PATH[:ARG])", flag_values=flag_values, sys_argv=rest
    )
    try:
        unparsed = flag_values(rest)
    except flags.Error as err:
        raise ConfigError(" ".join(str(err).split()).removeprefix("flag ")) from None
    if len(unparsed) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(unparsed[1:])} (options are --name=value)")
    flags.FLAGS.mark_as_parsed()  # absl's own flags: its logging then needs no warning about early use
    return flag_values["config"].value, flag_values


def _split_config_spec(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the PATH[:ARG] of --config, or None; argv without it)."""
    for i, arg in enumerate(argv[1:], start=1):
        if _CONFIG_SPEC.match(arg):
            if "=" in arg:
                return arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise ConfigError("--config needs a PATH (a config file, e.g. configs/tiny.py)")
            return argv[i + 1], argv[:i] + argv[i + 2 :]
    return None, list(argv)


def _load(spec: str):
    """The config of ``PATH[:ARG]``: get_config(ARG) of the file, run once."""
    path = spec.split(":", 1)[0]
    where = f"--config {spec}"
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: no such config file")
    flag_values = flags.FlagValues()
    try:  # (config_flags runs get_config when the flag is defined, its default being the file)
        config_flags.DEFINE_config_file(
            "config", spec, "ml_collections config file", flag_values=flag_values, sys_argv=["load"]
        )
        flag_values(["load"])
        return flag_values["config"].value
    except flags.Error as err:  # config_flags reports an error inside the file with its traceback: keep the last line
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise ConfigError(f"{where}: {lines[-1] if lines else type(err).__name__}") from None
    except Exception as err:  # noqa: BLE001 (whatever the user's config file raises, told in one line)
        cause = err.__cause__ or err.__context__ or err
        raise ConfigError(f"{where}: {type(cause).__name__}: {' '.join(str(cause).split())}") from None


def print_help(text: str) -> None:
    print(text.strip() + "\n", file=sys.stdout)
    sys.exit(0)
