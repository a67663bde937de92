"""Resume from the newest checkpoint that reads whole.

A checkpoint whose files are damaged (a truncated data file, a missing shard,
a garbled index) is reported, moved to `<ckpt_dir>/damaged/` and skipped;
the run resumes from the previous complete one. A checkpoint that reads but
does not fit the model is a checkpoint of another model: a ValueError.
"""

import glob
import os
import re
import shutil

from absl import logging
import tensorflow as tf

DAMAGED_DIRNAME = "damaged"
# tf.train.CheckpointManager's default checkpoint_name (run.py keeps it).
CHECKPOINT_NAME = "ckpt"
_NUMBER_RE = re.compile(r"-(\d+)$")


def _number(path):
    match = _NUMBER_RE.search(path)
    return int(match.group(1)) if match else -1


def damage(path):
    """Return why the checkpoint at `path` cannot be read, or None."""
    try:
        reader = tf.train.load_checkpoint(path)
        for key in reader.get_variable_to_shape_map():
            reader.get_tensor(key)
    except (tf.errors.OpError, IndexError, ValueError, OSError) as e:
        message = getattr(e, "message", None) or str(e)
        lines = [x for x in str(message).splitlines() if x.strip()]
        return lines[-1].strip() if lines else type(e).__name__
    return None


def _set_aside(path, ckpt_dir):
    target = os.path.join(ckpt_dir, DAMAGED_DIRNAME)
    os.makedirs(target, exist_ok=True)
    prefix = os.path.basename(path)
    for name in os.listdir(os.path.dirname(path) or "."):
        if name == prefix + ".index" or name.startswith(prefix + ".data-"):
            shutil.move(
                os.path.join(os.path.dirname(path), name),
                os.path.join(target, name),
            )
    return target


def remove_partial(manager, number):
    """Remove what a failed `manager.save(checkpoint_number=number)` left.

    A save that fails part-way (a full disk, a file-size limit) leaves
    TF's `<prefix>_temp*/` folder and possibly a data file without its
    index; the `checkpoint` state file still names only whole checkpoints,
    so the files are debris. An earlier whole checkpoint of the same number
    is kept.
    """
    prefix = os.path.join(manager.directory, f"{CHECKPOINT_NAME}-{number}")
    if any(os.path.abspath(p) == os.path.abspath(prefix)
           for p in manager.checkpoints):
        return
    pattern = glob.escape(prefix)
    for path in glob.glob(pattern + "_temp*") + glob.glob(pattern + ".*"):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                pass


def drop_damaged(ckpt_dir):
    """Set aside damaged checkpoints, newest first, up to a whole one.

    Rewrites the `checkpoint` state file so that a CheckpointManager created
    afterwards sees only the remaining checkpoints.

    Returns:
        The paths that were set aside (newest first).
    """
    state = tf.train.get_checkpoint_state(ckpt_dir)
    if state is None:
        return []
    paths = list(state.all_model_checkpoint_paths)
    if state.model_checkpoint_path and state.model_checkpoint_path not in paths:
        paths.append(state.model_checkpoint_path)
    paths = [
        p if os.path.isabs(p) else os.path.join(ckpt_dir, p) for p in paths
    ]
    paths.sort(key=_number)
    dropped = []
    while paths:
        reason = damage(paths[-1])
        if reason is None:
            break
        path = paths.pop()
        where = _set_aside(path, ckpt_dir)
        logging.warning(
            "checkpoint %s is damaged (%s); moved to %s, resuming from %s",
            path, reason, where, paths[-1] if paths else "scratch",
        )
        dropped.append(path)
    if dropped:
        state_file = os.path.join(ckpt_dir, "checkpoint")
        if paths:
            tf.compat.v1.train.update_checkpoint_state(
                ckpt_dir, paths[-1], all_model_checkpoint_paths=paths
            )
        else:
            os.replace(
                state_file,
                os.path.join(ckpt_dir, DAMAGED_DIRNAME, "checkpoint"),
            )
    return dropped


def restore(checkpoint, path):
    """Restore `path` into `checkpoint`; a mismatch is a ValueError."""
    status = None
    try:
        status = checkpoint.restore(path)
        status.assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as e:
        if status is not None:
            status.expect_partial()  # no warnings about it at exit
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"checkpoint of another model ({path}): {first[:300]}; expected "
            "a checkpoint of the model these flags describe (use a new "
            "workdir, or the flags of the run that wrote it)"
        ) from e
