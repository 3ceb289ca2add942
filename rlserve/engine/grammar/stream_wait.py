"""A CUDA stream that waits, on the device, for a 64-bit word in host memory to reach a value.

The grammar mask helpers write their step number into shared memory once their rows are filled. A
stream told to wait on those words can take the mask's copy and the sampling kernel before the masks
exist: the device starts them the moment the last helper answers, without the host in between. This
is the driver's stream memory operation (cuStreamWaitValue64), called through ctypes so that nothing
beyond the driver is needed; where it is missing or refused, `StreamWaiter.load()` gives None.
"""
from __future__ import annotations

import ctypes
from typing import Any

import torch

WAIT_GEQ = 0x0   # CU_STREAM_WAIT_VALUE_GEQ: go on once (int64)(*addr - value) >= 0


class StreamWaiter:
    def __init__(self, wait_fn: Any, pointer_fn: Any) -> None:
        self._wait = wait_fn
        self._pointer = pointer_fn

    @staticmethod
    def load() -> StreamWaiter | None:
        if not torch.cuda.is_available():
            return None
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError:
            return None
        wait_fn = getattr(lib, "cuStreamWaitValue64_v2", None) or getattr(lib, "cuStreamWaitValue64", None)
        pointer_fn = getattr(lib, "cuMemHostGetDevicePointer_v2", None)
        if wait_fn is None or pointer_fn is None:
            return None
        wait_fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint]
        wait_fn.restype = ctypes.c_int
        pointer_fn.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
        pointer_fn.restype = ctypes.c_int
        return StreamWaiter(wait_fn, pointer_fn)

    def device_address(self, host_address: int) -> int | None:
        """The device's address of page-locked (registered) host memory; None if it has none."""
        out = ctypes.c_uint64(0)
        return out.value if self._pointer(ctypes.byref(out), ctypes.c_void_p(host_address), 0) == 0 else None

    def wait(self, stream: torch.cuda.Stream, device_address: int, value: int) -> bool:
        """Queue on `stream`: wait until the int64 at device_address is >= value. False if refused."""
        return self._wait(ctypes.c_void_p(stream.cuda_stream), device_address, value, WAIT_GEQ) == 0
