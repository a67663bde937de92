"""Expose config dataclass fields as absl flags (entry points only)."""

from absl import flags

from uhga_tf import cli_errors
from uhga_tf import config

_DEFINE = {
    bool: flags.DEFINE_bool,
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    str: flags.DEFINE_string,
}


def define_config_flags(flag_values=flags.FLAGS, only=None):
    """Define one flag per config field, named as the field."""
    for name, default, kind, doc in config.flag_specs():
        if only is not None and name not in only:
            continue
        _DEFINE[kind](name, default, doc, flag_values=flag_values)


def config_values(flag_values=flags.FLAGS, only=None):
    """Flat {field: value} of the config flags."""
    return {
        name: flag_values[name].value
        for name, *_ in config.flag_specs()
        if (only is None or name in only) and name in flag_values
    }


def exit_on_user_error(verb, fn, *args, **kwargs):
    """Run fn; turn user errors into one stderr line and exit 1."""
    return cli_errors.run(verb, fn, *args, **kwargs)
