import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():  # type: ignore[no-untyped-def]
    # Every test problem is tiny: a multi-threaded OpenMP pool only adds overhead, and on a busy
    # 2-core machine oversubscription makes small kernels 10-100x slower.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
