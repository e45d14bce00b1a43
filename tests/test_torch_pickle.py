"""Reading `torch.save`d state dicts with NumPy only (`torch_pickle`): dtypes, views, refusal of code."""

from __future__ import annotations

import collections
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch

from dreambooth_jax.weights import torch_pickle


def test_dtypes_views_and_shapes(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = collections.OrderedDict(
        f32=torch.randn(3, 5), f16=torch.randn(2, 3).half(), bf16=torch.randn(4).bfloat16(),
        i64=torch.tensor([1, -2, 3]), boolean=torch.tensor([True, False]), scalar=torch.tensor(2.5),
        transposed=base.t(), sliced=base[1:3, 2:5], shared=base,  # views of one storage, offsets, strides
        param=torch.nn.Parameter(torch.ones(2, 2)),
    )
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    loaded = torch_pickle.load_file(str(path))
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        expected = tensor.detach()
        if expected.dtype == torch.bfloat16:
            expected = expected.float().numpy().astype(ml_dtypes.bfloat16)
        else:
            expected = expected.numpy()
        assert loaded[name].dtype == expected.dtype and loaded[name].shape == expected.shape, name
        np.testing.assert_array_equal(loaded[name], expected)
    assert loaded["transposed"].flags.c_contiguous


def test_refuses_anything_but_tensors(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.bin"
    torch.save({"weight": torch.ones(1), "x": Evil()}, path)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load (posix|os|nt)\\.system"):
        torch_pickle.load_file(str(path))
    legacy = tmp_path / "legacy.bin"
    torch.save({"weight": torch.ones(1)}, legacy, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(legacy)
    with pytest.raises(ValueError, match="legacy pre-1.6 files are not supported"):
        torch_pickle.load_file(str(legacy))


def test_rejects_layouts_that_reach_past_the_storage():
    storage = np.arange(4, dtype=np.float32)
    assert torch_pickle._rebuild_tensor(storage, 1, (3,), (1,)).tolist() == [1, 2, 3]
    assert torch_pickle._rebuild_tensor(storage, 0, (0, 5), (5, 1)).shape == (0, 5)
    for offset, size, stride in ((0, (65536,), (1,)), (2, (3,), (1,)), (-1, (2,), (1,)), (0, (2, 2), (3, 1)),
                                 (0, (2,), (-1,))):
        with pytest.raises(pickle.UnpicklingError, match="past its storage|invalid tensor layout"):
            torch_pickle._rebuild_tensor(storage, offset, size, stride)
