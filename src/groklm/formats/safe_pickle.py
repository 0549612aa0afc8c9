"""Reading a checkpoint pickle without running it, and with bounded work and memory, whatever the input.

Pickle is a small stack machine whose programs may call any importable function. A checkpoint comes
from strangers, so `SafeUnpickler` runs only the opcodes numpy, jax and dataclass pickles use, maps
the few globals such a file may name to inert stand-ins that record shape, dtype and where the bytes
lie, and refuses everything else before it runs. Array bytes written outside pickle frames (numpy's
data, by size) are never read here: they become a `FileSlice` and stay on disk.

A tiny file can still describe a huge object: a tuple holding the same tuple twice, a hundred levels
deep, is 2^100 elements to anything that hashes, compares or prints it. So every container built
gets a weight (1 + its children's weights, a shared child counted each time it is referenced), and a
container over `MAX_WEIGHT` is refused; a list or dict cannot change once another container holds
it; dict keys must be plain scalars; opcodes, memo entries and time are capped. Whatever the file, the
objects handed back can be traversed in O(MAX_WEIGHT), and error messages show them shortened.
"""

from __future__ import annotations

import io
import pickle
import reprlib
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import torch

from groklm.files import CheckpointError

MAX_WEIGHT = 4096  # elements a container may hold, nested ones counted (real files: under 40)
MAX_OPS = 100_000  # opcodes a file may run (real files: under 100)
MAX_MEMO = 10_000  # memo entries
MAX_SECONDS = 2.0  # a parse that runs longer is refused (real files: milliseconds)
MAX_DIMS = 64  # numpy's own limit

_DTYPES: dict[str, torch.dtype] = {
    "f4": torch.float32,
    "f2": torch.float16,
    "f8": torch.float64,
    "i1": torch.int8,
    "u1": torch.uint8,
    "i2": torch.int16,
    "i4": torch.int32,
    "i8": torch.int64,
    "b1": torch.bool,
}

_SHORT = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHORT.maxlevel, _SHORT.maxtuple, _SHORT.maxlist, _SHORT.maxdict = 2, 6, 6, 4
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = 40


def short(obj: Any) -> str:
    """A bounded repr for error messages (reprlib stops at depth 2 and 6 items a level)."""
    try:
        return _SHORT.repr(obj)
    except Exception:  # e.g. an int too long to print: the type is enough
        return f"<{type(obj).__name__}>"


@dataclass
class FileSlice:
    """Bytes of a pickle that stay on disk: `length` bytes at `offset`."""

    offset: int
    length: int


class _BFloat16:
    """Stands in for `ml_dtypes.bfloat16`; never instantiated."""


class _Stub:
    """A stand-in that pickle may BUILD once: `_build` checks the state."""

    _built = False

    def __setstate__(self, state: Any) -> None:
        if self._built:
            raise pickle.UnpicklingError(f"{type(self).__name__} built twice")
        self._build(state)
        self._built = True

    def _build(self, state: Any) -> None:
        raise NotImplementedError


class _DType(_Stub):
    """Stands in for `numpy.dtype(code, align, copy)` and its BUILD state."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        if code is _BFloat16:
            self.torch_dtype = torch.bfloat16
        elif isinstance(code, str) and code in _DTYPES:
            self.torch_dtype = _DTYPES[code]
        else:
            raise pickle.UnpicklingError(f"unsupported array dtype {short(code)}")
        self.byteorder = "="

    def _build(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2 or not isinstance(state[1], str):
            raise pickle.UnpicklingError(f"malformed dtype state {short(state)}")
        self.byteorder = state[1]
        if self.byteorder == ">":
            raise pickle.UnpicklingError("big-endian arrays are not supported")


class ArrayStub(_Stub):
    """Stands in for `numpy.ndarray`; records shape, dtype and the data's location."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    data: bytes | FileSlice

    def _build(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError(f"malformed ndarray state {short(state)}")
        _version, shape, dtype, fortran, data = state
        self._fill(data, dtype, shape, "F" if fortran else "C")

    def _fill(self, data: Any, dtype: Any, shape: Any, order: Any) -> None:
        if not isinstance(dtype, _DType):
            raise pickle.UnpicklingError(f"ndarray without a dtype: {short(dtype)}")
        if not (isinstance(shape, tuple) and len(shape) <= MAX_DIMS and all(type(n) is int and n >= 0 for n in shape)):
            raise pickle.UnpicklingError(f"malformed ndarray shape {short(shape)}")
        if order != "C":
            raise pickle.UnpicklingError("Fortran-ordered arrays are not supported")
        if isinstance(data, bytearray):
            data = bytes(data)
        if not isinstance(data, (bytes, FileSlice)):
            raise pickle.UnpicklingError(
                f"ndarray data is {type(data).__name__}, not raw bytes (object arrays are refused)"
            )
        self.shape, self.dtype, self.data = shape, dtype.torch_dtype, data
        expected = self.numel * self.dtype.itemsize
        got = data.length if isinstance(data, FileSlice) else len(data)
        if got != expected:
            raise pickle.UnpicklingError(f"array {shape} {self.dtype} needs {expected} bytes, has {got}")

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> ArrayStub:
    if cls is not ArrayStub:
        raise pickle.UnpicklingError("numpy _reconstruct called on something other than ndarray")
    return ArrayStub()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> ArrayStub:
    """numpy's protocol-5 array: `_frombuffer(data, dtype, shape, order)`."""
    arr = ArrayStub()
    arr._fill(buffer, dtype, shape, order)
    arr._built = True
    return arr


def _jax_reconstruct_array(fun: Any, args: Any, arr_state: Any, aval_state: Any = None) -> ArrayStub:
    # jax pickles an Array as (_reconstruct_array, (numpy's reconstruct, its args, ndarray state, aval)).
    if fun is not _reconstruct or not isinstance(args, tuple) or len(args) != 3:
        raise pickle.UnpicklingError("jax array reconstruction with an unexpected function")
    arr = fun(*args)
    arr.__setstate__(arr_state)
    return arr


class QuantizedWeight8bit(_Stub):
    """Stands in for the reference's dataclass: int8 `weight` and its `scales`."""

    weight: ArrayStub
    scales: ArrayStub

    def _build(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = state[0]
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            raise pickle.UnpicklingError("QuantizedWeight8bit without exactly weight and scales")
        if not all(isinstance(v, ArrayStub) and v._built for v in state.values()):
            raise pickle.UnpicklingError("QuantizedWeight8bit fields must be arrays")
        self.weight, self.scales = state["weight"], state["scales"]


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): ArrayStub,
    ("numpy", "dtype"): _DType,
    ("ml_dtypes", "bfloat16"): _BFloat16,
    ("__main__", "QuantizedWeight8bit"): QuantizedWeight8bit,
    ("model", "QuantizedWeight8bit"): QuantizedWeight8bit,
    ("jax._src.array", "_reconstruct_array"): _jax_reconstruct_array,
}
_CALLABLE = (_reconstruct, _frombuffer, _DType, _jax_reconstruct_array)  # what REDUCE may call
_SCALAR_KEYS = (str, int, bytes, bool, type(None))


class _BoundedFile:
    """A file that refuses to read past its end: a corrupt length in a pickle (an 8-byte string
    length, say) then fails at once instead of asking for exabytes of memory."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        self._file, self._size = file, size

    def check(self, n: int, what: str = "the pickle") -> None:
        """Raise unless `n` more bytes lie between the position and the end."""
        at = self._file.tell()
        if n > self._size - at:
            raise CheckpointError(f"truncated or corrupt: {what} needs {at + n} bytes, has {self._size}")

    def read(self, n: int = -1) -> bytes:
        if n is not None and n >= 0:
            self.check(n)
        return self._file.read(n)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        self.check(len(buffer))
        return self._file.readinto(buffer)  # type: ignore[attr-defined, no-any-return]

    def readline(self) -> bytes:
        return self._file.readline(4096)

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)


_P = pickle._Unpickler  # type: ignore[attr-defined]


class _Dispatch(dict[int, Any]):
    def __missing__(self, code: int) -> Any:
        raise pickle.UnpicklingError(f"pickle opcode {bytes([code])!r} is not allowed in a checkpoint")


# The opcodes of protocol 2-5 pickles of numpy arrays, jax arrays and dataclasses; nothing else runs
# (no persistent ids, extension codes, INST/OBJ, sets, out-of-band buffers or protocol-0 text forms).
_OPCODES = [
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "NONE", "NEWTRUE", "NEWFALSE",
    "BININT", "BININT1", "BININT2", "LONG1", "LONG4", "BINFLOAT",
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING",
    "EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE", "EMPTY_LIST", "APPEND", "APPENDS", "LIST",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS",
    "GLOBAL", "STACK_GLOBAL", "REDUCE", "NEWOBJ", "BUILD",
    "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET",
]  # fmt: skip


class SafeUnpickler(_P):
    """Pure-Python unpickler that runs only `_OPCODES`, resolves only the globals in `_ALLOWED` (to
    inert stand-ins), and bounds every container's weight, the opcode count, the memo and the time
    (see the module docstring). Byte strings outside a pickle frame become `FileSlice`s."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        self._fileobj = _BoundedFile(file, size)  # a corrupt length fails here, before any allocation
        super().__init__(self._fileobj)
        self._weights: dict[int, int] = {}  # id(container) -> weight
        self._held: list[Any] = []  # keeps weighed containers alive, so their ids stay theirs
        self._sealed: set[int] = set()  # ids of lists and dicts another container holds
        self._ops = 0
        self._deadline = time.monotonic() + MAX_SECONDS

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            names = [n[:100] if isinstance(n, str) else short(n) for n in (module, name)]
            raise pickle.UnpicklingError(f"refusing to load global {names[0]}.{names[1]}") from None

    # -- accounting -----------------------------------------------------------------------------

    def _weight(self, obj: Any) -> int:
        return self._weights.get(id(obj), 1)

    def _weigh(self, container: Any, children: Any, base: int = 1) -> None:
        """Record `container`'s weight: `base` plus its children's; seal the mutable children."""
        total = base
        for child in children:
            total += self._weight(child)
            if isinstance(child, (list, dict)):
                self._sealed.add(id(child))
        if total > MAX_WEIGHT:
            raise pickle.UnpicklingError(
                f"a container of over {MAX_WEIGHT} elements (nested ones counted): not a checkpoint"
            )
        if id(container) not in self._weights:
            self._held.append(container)
        self._weights[id(container)] = total

    def _mutable(self, target: Any, kind: type) -> None:
        if not isinstance(target, kind):
            raise pickle.UnpicklingError(f"cannot add items to a {type(target).__name__}")
        if id(target) in self._sealed:
            raise pickle.UnpicklingError(f"a {kind.__name__} changed after another container took it")

    def _keys(self, keys: Any) -> None:
        for k in keys:
            if not isinstance(k, _SCALAR_KEYS):  # hashing a nested key could take forever
                raise pickle.UnpicklingError(f"dict key of type {type(k).__name__}")

    # -- the opcodes that build containers, call or set state ----------------------------------

    def _tuple(self, n: int | None) -> None:
        items = self.pop_mark() if n is None else ([] if n == 0 else self.stack[-n:])
        if n:
            del self.stack[-n:]
        t = tuple(items)
        self._weigh(t, t)
        self.append(t)

    def _list(self) -> None:
        items = self.pop_mark()
        self._weigh(items, items)
        self.append(items)

    def _empty(self, kind: type) -> None:
        obj = kind()
        self._weigh(obj, ())
        self.append(obj)

    def _appends(self, items: list[Any]) -> None:
        target = self.stack[-1]
        self._mutable(target, list)
        self._weigh(target, items, base=self._weight(target))
        target.extend(items)

    def _setitems(self, items: list[Any]) -> None:
        target = self.stack[-1]
        self._mutable(target, dict)
        self._keys(items[::2])
        self._weigh(target, items, base=self._weight(target))
        for i in range(0, len(items) - 1, 2):
            target[items[i]] = items[i + 1]

    def _setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._setitems([key, value])

    def _dict(self) -> None:
        items = self.pop_mark()
        self._keys(items[::2])
        d = {items[i]: items[i + 1] for i in range(0, len(items) - 1, 2)}
        self._weigh(d, items)
        self.append(d)

    def _reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if not any(func is f for f in _CALLABLE) or not isinstance(args, tuple):
            raise pickle.UnpicklingError(f"refusing to call {short(func)}")
        self.stack[-1] = func(*args)

    def _newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls is not QuantizedWeight8bit or args != ():
            raise pickle.UnpicklingError(f"refusing to create {short(cls)}")
        self.append(QuantizedWeight8bit())

    def _build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, _Stub):  # a class, a function: BUILD would set its attributes for good
            raise pickle.UnpicklingError(f"refusing to set the state of {short(inst)}")
        inst.__setstate__(state)

    def _memo_put(self, base: Any) -> None:
        if len(self.memo) >= MAX_MEMO:
            raise pickle.UnpicklingError(f"more than {MAX_MEMO} memo entries")
        base(self)

    def _bytes(self, fmt: str) -> None:
        (length,) = struct.unpack(fmt, self.read(struct.calcsize(fmt)))
        if self._unframer.current_frame is not None:  # small, inside a frame: it is in memory already
            self.append(self.read(length))
            return
        offset = self._fileobj.tell()
        self._fileobj.check(length, "its array data")
        self._fileobj.seek(length, io.SEEK_CUR)
        self.append(FileSlice(offset, length))

    @staticmethod
    def _counted(handler: Any) -> Any:
        def run(self: SafeUnpickler) -> None:
            self._ops += 1
            if self._ops > MAX_OPS:
                raise pickle.UnpicklingError(f"more than {MAX_OPS} pickle opcodes: not a checkpoint")
            if not self._ops % 1024 and time.monotonic() > self._deadline:
                raise pickle.UnpicklingError(f"parsing took over {MAX_SECONDS} s: not a checkpoint")
            handler(self)

        return run

    _HANDLERS: ClassVar[dict[str, Any]] = {
        "TUPLE": lambda self: self._tuple(None),
        "EMPTY_TUPLE": lambda self: self._tuple(0),
        "TUPLE1": lambda self: self._tuple(1),
        "TUPLE2": lambda self: self._tuple(2),
        "TUPLE3": lambda self: self._tuple(3),
        "LIST": lambda self: self._list(),
        "EMPTY_LIST": lambda self: self._empty(list),
        "EMPTY_DICT": lambda self: self._empty(dict),
        "APPEND": lambda self: self._appends([self.stack.pop()]),
        "APPENDS": lambda self: self._appends(self.pop_mark()),
        "SETITEM": lambda self: self._setitem(),
        "SETITEMS": lambda self: self._setitems(self.pop_mark()),
        "DICT": lambda self: self._dict(),
        "REDUCE": lambda self: self._reduce(),
        "NEWOBJ": lambda self: self._newobj(),
        "BUILD": lambda self: self._build(),
        "SHORT_BINBYTES": lambda self: self._bytes("<B"),
        "BINBYTES": lambda self: self._bytes("<I"),
        "BINBYTES8": lambda self: self._bytes("<Q"),
        "BYTEARRAY8": lambda self: self._bytes("<Q"),  # numpy protocol 5: data outside frames stays on disk
    }
    dispatch: ClassVar[dict[int, Any]] = _Dispatch()


for _name in [*_OPCODES, "SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8"]:
    _code = getattr(pickle, _name)[0]
    _base = _P.dispatch[_code]
    if _name in SafeUnpickler._HANDLERS:
        _handler = SafeUnpickler._HANDLERS[_name]
    elif _name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
        _handler = lambda self, base=_base: self._memo_put(base)  # noqa: E731
    else:
        _handler = _base
    SafeUnpickler.dispatch[_code] = SafeUnpickler._counted(_handler)


Record = ArrayStub | QuantizedWeight8bit


def read_record(path: Path) -> Record:
    """Parse one tensor file's pickle; array bytes stay on disk. Raises CheckpointError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            obj = SafeUnpickler(f, size).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a tensor file") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error, OverflowError,
            RecursionError, MemoryError, UnicodeDecodeError) as e:  # fmt: skip
        raise CheckpointError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {short(str(e))})") from None
    if not isinstance(obj, (ArrayStub, QuantizedWeight8bit)) or not obj._built:
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not an array or QuantizedWeight8bit")
    return obj
