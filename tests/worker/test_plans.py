"""Choosing dtype plans: auto per device, explicit precisions, refusals."""

from __future__ import annotations

import pytest
import torch

from worker.plans import DEVICES, Plan, bf16_supported, choose_plan, detect_device

CUDA_HAS_BF16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def test_auto_on_cpu_is_fp32() -> None:
    plan, reason = choose_plan("auto", "cpu")
    assert plan == Plan("cpu", "fp32", "fp32", "fp32")
    assert reason is None
    assert plan.name == "fp32 on cpu"


def test_auto_on_mps_is_fp16() -> None:
    plan, reason = choose_plan("auto", "mps")
    assert (plan.unet, plan.vae, plan.image_encoder, plan.device) == ("fp16",) * 3 + ("mps",)
    assert reason is None


def test_auto_on_cuda_follows_bf16_support() -> None:
    plan, reason = choose_plan("auto", "cuda")
    expected = "bf16" if CUDA_HAS_BF16 else "fp16"
    assert plan == Plan.uniform(expected, "cuda")
    assert reason is None
    if not torch.cuda.is_available():
        assert plan.name == "fp16 on cuda"


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_explicit_precision_is_honoured_on_cpu(precision: str) -> None:
    plan, reason = choose_plan(precision, "cpu")
    assert plan == Plan.uniform(precision, "cpu")
    assert reason is None


def test_precision_is_read_loosely() -> None:
    assert choose_plan(" BF16 ", "cpu")[0] == Plan.uniform("bf16", "cpu")


@pytest.mark.skipif(CUDA_HAS_BF16, reason="this GPU supports bf16")
def test_bf16_on_cuda_without_bf16_falls_back_to_fp16_with_a_reason() -> None:
    plan, reason = choose_plan("bf16", "cuda")
    assert plan == Plan.uniform("fp16", "cuda")
    assert reason is not None and "bf16" in reason and "fp16" in reason


def test_unknown_precision_and_device_are_refused() -> None:
    with pytest.raises(ValueError, match="'int8'"):
        choose_plan("int8", "cpu")
    with pytest.raises(ValueError, match="'tpu'"):
        choose_plan("auto", "tpu")
    with pytest.raises(ValueError, match="'fp8'"):
        Plan("cpu", "fp32", "fp8", "fp32")


def test_mixed_plan_name_groups_components_by_dtype() -> None:
    plan = Plan(device="cuda", image_encoder="bf16", unet="bf16", vae="fp32")
    assert plan.name == "bf16 unet+enc, fp32 vae on cuda"
    assert not plan.is_uniform
    assert Plan("cuda", "fp16", "bf16", "fp32").name == "bf16 unet, fp16 enc, fp32 vae on cuda"


def test_plan_is_data() -> None:
    plan = Plan(device="cuda:1", image_encoder="fp16", unet="bf16", vae="fp32")
    assert plan.as_dict() == {
        "device": "cuda:1",
        "image_encoder": "fp16",
        "unet": "bf16",
        "vae": "fp32",
        "name": plan.name,
    }
    same = Plan(device="cuda:1", image_encoder="fp16", unet="bf16", vae="fp32")
    assert {plan.key(): 1}[same.key()] == 1
    assert plan.key() != Plan.uniform("bf16", "cuda:1").key()
    assert plan.torch_dtype("unet") is torch.bfloat16
    assert plan.torch_dtype("image_encoder") is torch.float16
    assert plan.torch_dtype("vae") is torch.float32
    with pytest.raises(ValueError, match="'text_encoder'"):
        plan.torch_dtype("text_encoder")


def test_detect_device_and_bf16_support_here() -> None:
    device = detect_device()
    assert device in DEVICES
    if torch.cuda.is_available():
        assert device == "cuda"
    elif not torch.backends.mps.is_available():
        assert device == "cpu"
    assert bf16_supported("cpu") is True
    assert bf16_supported("cuda") is CUDA_HAS_BF16
    assert choose_plan("auto")[0].device == device
