"""The attention kernel choice: SDPA on CPU, xformers only where it can run, and the kernel
path of `attend` hands xformers its (batch, tokens, heads, dim) layout."""

import pytest
import torch
import torch.nn.functional as F

from parallel.errors import ConfigError
from parallel.patch import kernels
from parallel.patch.attention import attend

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def test_auto_is_sdpa_on_cpu_and_without_xformers(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.choose_kernel(CPU, unet=True) == "sdpa"
    monkeypatch.setattr(kernels, "_xformers_kernel", lambda: None)
    assert kernels.choose_kernel(CUDA, unet=True) == "sdpa"


def test_auto_takes_xformers_on_cuda_for_unets_only(monkeypatch):
    monkeypatch.setattr(kernels, "_xformers_kernel", lambda: object())
    assert kernels.choose_kernel(CUDA, unet=True, requested="auto") == "xformers"
    assert kernels.choose_kernel(CUDA, unet=False, requested="auto") == "sdpa"
    assert kernels.choose_kernel(CUDA, unet=True, requested="sdpa") == "sdpa"


def test_xformers_asked_where_it_cannot_run_is_refused(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "xformers")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        kernels.choose_kernel(CPU, unet=True)
    monkeypatch.setenv(kernels.ENV, "flash")
    with pytest.raises(ConfigError, match="TESSERA_ATTENTION='flash'"):
        kernels.choose_kernel(CPU, unet=True)


def test_a_kernel_receives_bmhk_and_matches_sdpa():
    seen = []

    def bmhk_kernel(q, k, v):  # what xformers.ops.memory_efficient_attention computes
        seen.append(q.shape)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    q, k, v = torch.randn(2, 12, 3, 8), torch.randn(2, 20, 3, 8), torch.randn(2, 20, 3, 8)
    torch.testing.assert_close(attend(q, k, v, bmhk_kernel), attend(q, k, v))
    assert seen == [torch.Size((2, 12, 3, 8))]
