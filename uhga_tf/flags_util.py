"""Expose config dataclass fields as absl flags (entry points only)."""

from absl import flags

from uhga_tf import cli_errors
from uhga_tf import config
from uhga_tf.saved_model import wire_names

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


def define_query_flags(flag_values=flags.FLAGS):
    """--index and how queries are encoded (exactly one of --model and
    --server): the flags `search` and `search_page` share."""
    flags.DEFINE_string("index", None, "Index directory from uhga_tf.index.",
                        flag_values=flag_values)
    flags.DEFINE_string("model", None,
                        "SavedModel directory for the queries.",
                        flag_values=flag_values)
    flags.DEFINE_string("server", None,
                        "HOST:PORT of a gRPC server encoding the queries.",
                        flag_values=flag_values)
    flags.DEFINE_string("model_name", wire_names.DEFAULT_MODEL_NAME,
                        "Model name on --server.", flag_values=flag_values)
    flags.mark_flags_as_required(["index"], flag_values=flag_values)
    flags.register_multi_flags_validator(
        ["model", "server"],
        lambda f: (f["model"] is None) != (f["server"] is None),
        message="give exactly one of --model and --server",
        flag_values=flag_values,
    )


def exit_on_user_error(verb, fn, *args, **kwargs):
    """Run fn; turn user errors into one stderr line and exit 1."""
    return cli_errors.run(verb, fn, *args, **kwargs)
