import pytest
import torch


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """For test modules of many small ops: one intra-op thread, not the two the suite's conftest sets, which on a
    shared two-core machine spend most of their time waiting for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
