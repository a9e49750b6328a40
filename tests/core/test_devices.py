"""core.devices and the strict stand-in (tests.strict): pooled events, the host/device flag,
CUDA's last error."""

from __future__ import annotations

import pytest
import torch

from hetegen_cli.core.devices import CpuBackend, clear_last_cuda_error
from tests.strict import StrictBackend, StrictHazard


def test_stand_ins_compute_device_work_on_the_host():
    assert CpuBackend.device_is_host and StrictBackend.device_is_host
    from hetegen_cli.core.devices import CudaBackend

    assert not CudaBackend.device_is_host


def test_a_pooled_event_recorded_again_stands_for_the_later_work():
    backend = StrictBackend()
    stream = backend.new_stream()
    src, dst = torch.ones(4), torch.zeros(4)
    event = backend.record_event(stream)  # before any copy: complete
    backend.to_device_async(dst, src, stream)
    assert backend.record_event(stream, event) is event  # the same object, recorded again
    assert torch.isnan(dst).all()  # the copy has not happened yet
    event.synchronize()
    assert torch.equal(dst, src)


def test_a_compute_stream_copy_source_rewritten_before_it_is_known_done_is_refused():
    backend = StrictBackend()
    src, dst = torch.ones(4), torch.zeros(4)
    backend.to_device_async(dst, src)  # compute stream: lands now, reads its source later
    assert torch.equal(dst, src)
    done = backend.record_event()
    done.synchronize()  # known done: the source may change now
    src.fill_(2.0)
    backend.to_device_async(dst, src)
    src.fill_(3.0)  # too early: no event after the copy was waited for
    with pytest.raises(StrictHazard, match="rewritten"):
        backend.synchronize()


@pytest.mark.cuda
def test_a_failed_host_registration_leaves_no_cuda_error_behind():
    """cudaHostRegister's failure stays as the thread's last error; torch's next launch check
    would report it. Registering the same memory twice fails; clearing it keeps CUDA usable."""
    from hetegen_cli.core.devices import CudaBackend

    backend = CudaBackend()
    arena = backend.pinned_arena(1 << 20)
    try:
        err = torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), arena.numel(), 0)
        assert int(err) != 0
        assert clear_last_cuda_error() == int(err)
        assert clear_last_cuda_error() == 0
        assert (torch.ones(4, device=backend.device) + 1).sum().item() == 8.0
    finally:
        backend.release_arena(arena)
