"""Error classes against the exceptions real torch calls raise on CPU, and the user's messages.

Where torch cannot raise an error on CPU (CUDA and MPS out of memory, CUDA's conv wording) the
exception is built with the message those backends print; everything else is raised for real.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from celery.exceptions import SoftTimeLimitExceeded

from svdfarm.states import ErrorClass
from worker.errors import NonFiniteOutput, check_finite, classify, user_message
from worker.pipeline import ModelUnavailable

BF16 = torch.bfloat16
X = torch.randn(2, 4)
W = torch.randn(3, 4)
IMG = torch.randn(1, 3, 8, 8)
QKV = torch.randn(1, 2, 4, 8)


def raised(call: Callable[[], object]) -> BaseException:
    """The exception ``call`` raises; fails the test when it raises none."""
    try:
        call()
    except BaseException as exc:  # whatever torch raises is what the test inspects
        return exc
    pytest.fail("expected the call to raise")


# (what, call, a piece of the message torch 2.13 raises) — the message is pinned so that a
# torch upgrade that rewords it shows up here rather than as an unretried failure in production.
MIXED_DTYPE_CALLS = [
    (
        "conv2d bf16 module, float input (the origin bug)",
        lambda: torch.nn.Conv2d(3, 4, 3).to(BF16)(IMG),
        "Input type (float) and bias type (c10::BFloat16) should be the same",
    ),
    (
        "conv2d bf16 input, float weight, no bias",
        lambda: F.conv2d(IMG.to(BF16), torch.randn(4, 3, 3, 3)),
        "Input type (CPUBFloat16Type) and weight type (torch.FloatTensor) should be the same",
    ),
    (
        "conv2d bf16 weight, float bias",
        lambda: F.conv2d(IMG, torch.randn(4, 3, 3, 3).to(BF16), torch.randn(4)),
        "expected scalar type Float but found BFloat16",
    ),
    (
        "nn.Linear bf16, float input",
        lambda: torch.nn.Linear(4, 3).to(BF16)(X),
        "mat1 and mat2 must have the same dtype, but got Float and BFloat16",
    ),
    (
        "F.linear float input, bf16 weight, no bias",
        lambda: F.linear(X, W.to(BF16)),
        "expected m1 and m2 to have the same dtype, but got: float != c10::BFloat16",
    ),
    (
        "F.linear bf16 bias",
        lambda: F.linear(X, W, torch.randn(3).to(BF16)),
        "self and mat2 must have the same dtype, but got BFloat16 and Float",
    ),
    (
        "matmul 2-D",
        lambda: torch.matmul(X, W.t().to(BF16)),
        "expected m1 and m2 to have the same dtype",
    ),
    (
        "bmm",
        lambda: torch.bmm(X[None], W.t().to(BF16)[None]),
        "expected scalar type Float but found BFloat16",
    ),
    (
        "baddbmm batch",
        lambda: torch.baddbmm(torch.zeros(1, 2, 3), X[None], W.t().to(BF16)[None]),
        "expected scalar type Float but found BFloat16",
    ),
    (
        "baddbmm input",
        lambda: torch.baddbmm(torch.zeros(1, 2, 3).to(BF16), X[None], W.t()[None]),
        "Input dtypes must be the same, got: input c10::BFloat16, batch1: float, batch2: float",
    ),
    (
        "einsum",
        lambda: torch.einsum("ij,kj->ik", X, W.to(BF16)),
        "expected scalar type Float but found BFloat16",
    ),
    (
        "layer_norm bf16 module, float input",
        lambda: torch.nn.LayerNorm(4).to(BF16)(X),
        "mixed dtype (CPU): expect parameter to have scalar type of Float",
    ),
    (
        "group_norm bf16 module, float input",
        lambda: torch.nn.GroupNorm(1, 3).to(BF16)(IMG),
        "mixed dtype (CPU): expect parameter to have scalar type of Float",
    ),
    (
        "scaled_dot_product_attention",
        lambda: F.scaled_dot_product_attention(QKV, QKV.to(BF16), QKV.to(BF16)),
        "Expected query, key, and value to have the same dtype, but got query.dtype: float "
        "key.dtype: c10::BFloat16 and value.dtype: c10::BFloat16 instead.",
    ),
    (
        "scaled_dot_product_attention mask",
        lambda: F.scaled_dot_product_attention(QKV, QKV, QKV, attn_mask=torch.zeros(4, 4).to(BF16)),
        "Expected attn_mask dtype to be bool or float or to match query dtype",
    ),
    (
        "addmv",
        lambda: torch.addmv(torch.zeros(3), W, X[0].to(BF16)),
        "addmv input tensors must have the same dtype, but got Float, Float, and BFloat16",
    ),
    (
        "dot",
        lambda: torch.dot(X[0], X[0].to(BF16)),
        "dot : expected both vectors to have same dtype, but found Float and BFloat16",
    ),
    (
        "index_put",
        lambda: X.clone().index_put_((torch.tensor([0]),), X[:1].to(BF16)),
        "Index put requires the source and destination dtypes match",
    ),
    (
        "index_add",
        lambda: X.index_add(0, torch.tensor([0]), X[:1].to(BF16)),
        "index_add_(): self (Float) and source (BFloat16) must have the same scalar type",
    ),
    (
        "masked_scatter",
        lambda: X.masked_scatter(X > 0, X.to(BF16)),
        "masked_scatter: expected self and source to have same dtypes",
    ),
    (
        "scatter",
        lambda: X.scatter(0, torch.zeros(2, 4, dtype=torch.long), X.to(BF16)),
        "scatter(): Expected self.dtype to be equal to src.dtype",
    ),
    (
        "lerp",
        lambda: torch.lerp(X, X.to(BF16), 0.5),
        "expected dtype float for `end` but got dtype c10::BFloat16",
    ),
    (
        "prelu",
        lambda: F.prelu(X, torch.ones(1, dtype=BF16)),
        "prelu: Type promoting not supported. Got Float and BFloat16",
    ),
]


@pytest.mark.parametrize(
    ("call", "message"),
    [pytest.param(call, message, id=what) for what, call, message in MIXED_DTYPE_CALLS],
)
def test_real_mixed_dtype_errors_are_dtype_mismatches(
    call: Callable[[], object], message: str
) -> None:
    exc = raised(call)
    assert isinstance(exc, RuntimeError)
    assert message in str(exc)
    assert classify(exc) is ErrorClass.DTYPE_MISMATCH


def test_cat_promotes_instead_of_raising() -> None:
    # No marker is needed for cat or stack: torch 2.13 promotes mixed inputs.
    assert torch.cat([X, X.to(BF16)]).dtype == torch.float32


@pytest.mark.parametrize(
    "exc",
    [
        # CUDA's conv wording, as printed on a GPU.
        RuntimeError(
            "Input type (torch.cuda.FloatTensor) and weight type (torch.cuda.HalfTensor) "
            "should be the same"
        ),
        # diffusers' attention dispatch checks raise ValueError.
        ValueError("Query and key must have the same dtype."),
    ],
    ids=["cuda conv", "diffusers attention check"],
)
def test_gpu_and_diffusers_dtype_messages(exc: Exception) -> None:
    assert classify(exc) is ErrorClass.DTYPE_MISMATCH


def test_device_mismatch_is_not_a_dtype_mismatch() -> None:
    # Same dtype on two devices: another plan's dtype cannot fix a placement bug.
    conv = RuntimeError(
        "Input type (torch.FloatTensor) and weight type (torch.cuda.FloatTensor) should be the "
        "same or input should be a MKLDNN tensor and weight is a dense tensor"
    )
    assert classify(conv) is ErrorClass.OTHER
    assert classify(RuntimeError("Expected all tensors to be on the same device")) is (
        ErrorClass.OTHER
    )


def test_wrong_integer_dtype_is_other() -> None:
    exc = raised(lambda: F.cross_entropy(X, torch.tensor([0.0, 1.0])))
    assert "expected target dtype to be Long or Byte" in str(exc)
    assert classify(exc) is ErrorClass.OTHER


def test_real_cpu_allocation_failure_is_out_of_memory() -> None:
    # 4 EiB is beyond any address space: malloc refuses at once, no memory is touched.
    started = time.monotonic()
    exc = raised(lambda: torch.empty(2**62, dtype=torch.uint8))
    assert time.monotonic() - started < 5
    assert type(exc) is RuntimeError
    assert "DefaultCPUAllocator" in str(exc)
    assert "can't allocate memory" in str(exc) or "not enough memory" in str(exc)
    assert classify(exc) is ErrorClass.OUT_OF_MEMORY


@pytest.mark.parametrize(
    "exc",
    [
        # torch raises OutOfMemoryError only from the CUDA (and XPU) caching allocators, so on a
        # CPU machine the test builds it with the message CUDA prints.
        torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
            "139.81 GiB of which 3.12 GiB is free."
        ),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError(
            "MPS backend out of memory (MPS allocated: 18.10 GB, other allocations: 1.20 GB, "
            "max allowed: 20.40 GB). Tried to allocate 256.00 MB on private pool."
        ),
        MemoryError(),
    ],
    ids=["torch.OutOfMemoryError", "cublas", "mps", "MemoryError"],
)
def test_out_of_memory_messages(exc: BaseException) -> None:
    assert classify(exc) is ErrorClass.OUT_OF_MEMORY


def test_causes_are_followed_unless_suppressed() -> None:
    oom = raised(lambda: torch.empty(2**62, dtype=torch.uint8))
    wrapped = RuntimeError("decoding failed")
    wrapped.__cause__ = oom
    assert classify(wrapped) is ErrorClass.OUT_OF_MEMORY
    hidden = RuntimeError("decoding failed")
    hidden.__context__, hidden.__suppress_context__ = oom, True
    assert classify(hidden) is ErrorClass.OTHER


def test_nan_from_a_real_op_is_non_finite() -> None:
    latents = torch.log(torch.tensor([[1.0, -1.0], [2.0, 3.0]]))  # log(-1) is NaN
    with pytest.raises(NonFiniteOutput, match=r"NaN/inf in latents: 1 NaN and 0 infinite of 4"):
        check_finite(latents, "latents")
    overflow = torch.tensor([60000.0, 1.0], dtype=torch.float16) * 2  # past fp16's 65504
    exc = raised(lambda: check_finite(overflow, "decoded frames"))
    assert "0 NaN and 1 infinite of 2 values (float16)" in str(exc)
    assert classify(exc) is ErrorClass.NON_FINITE


def test_check_finite_on_numpy_arrays() -> None:
    with np.errstate(all="ignore"):
        frames = np.array([[0.5, 1.0], [0.0, 0.0]], dtype=np.float32) / np.float32(0.0)
    with pytest.raises(NonFiniteOutput, match=r"NaN/inf in frames: 2 NaN and 2 infinite"):
        check_finite(frames, "frames")


def test_check_finite_accepts_finite_and_integer_values() -> None:
    check_finite(torch.randn(4, 4).to(BF16), "latents")
    check_finite(np.zeros((2, 8, 8, 3), dtype=np.uint8), "frames")
    check_finite(torch.arange(3), "indices")
    check_finite(np.linspace(0.0, 1.0, 5), "frames")


def test_other_classes() -> None:
    assert classify(ValueError("height must be divisible by 8, got 100")) is ErrorClass.OTHER
    assert classify(ModelUnavailable("Model 'x' not found.")) is ErrorClass.MODEL_UNAVAILABLE
    assert classify(SoftTimeLimitExceeded()) is ErrorClass.TIMEOUT


def test_user_messages() -> None:
    missing = ModelUnavailable("Model 'x' not found; set SVDFARM_MODEL.")
    assert user_message(ErrorClass.MODEL_UNAVAILABLE, missing) == str(missing)
    assert user_message(ErrorClass.TIMEOUT, SoftTimeLimitExceeded(), time_limit_s=10800) == (
        "The render took longer than its time limit of 10800 s (SVDFARM_TASK_SOFT_TIME_LIMIT) "
        "and was stopped. Submit fewer frames, fewer steps or a smaller size, or ask an "
        "operator to raise the limit."
    )
    assert "SVDFARM_TASK_SOFT_TIME_LIMIT" in user_message(
        ErrorClass.TIMEOUT, SoftTimeLimitExceeded()
    )
    oom = raised(lambda: torch.empty(2**62, dtype=torch.uint8))
    text = user_message(ErrorClass.OUT_OF_MEMORY, oom)
    assert text.startswith("The worker ran out of memory ([enforce fail")
    assert text.endswith("Try fewer frames or a smaller size.")
    nan = raised(lambda: check_finite(torch.tensor([float("nan")]), "latents"))
    assert user_message(ErrorClass.NON_FINITE, nan) == (
        f"The render produced invalid pixels ({nan}). Choose precision fp32 and submit again."
    )
    conv = raised(lambda: torch.nn.Conv2d(3, 4, 3).to(BF16)(IMG))
    assert user_message(ErrorClass.DTYPE_MISMATCH, conv) == (
        "The model's parts disagreed on number precision (Input type (float) and bias type "
        "(c10::BFloat16) should be the same). Choose precision fp32 and submit again; "
        "an operator can requeue the job."
    )
    other = user_message(ErrorClass.OTHER, FileNotFoundError("input.png"))
    assert other.startswith("The render failed: FileNotFoundError: input.png.")
    assert user_message(ErrorClass.OTHER, RuntimeError()).startswith(
        "The render failed: RuntimeError: RuntimeError."
    )
    # A detail that ends a sentence itself does not end ours with "..".
    ended = user_message(ErrorClass.OTHER, ValueError("The image is empty."))
    assert ended.startswith("The render failed: ValueError: The image is empty. The attempt")
    assert ".." not in ended


def test_a_time_limit_failure_names_the_limit_and_its_variable() -> None:
    """The ladder's failure on a timeout says which limit it hit and where it is set."""
    from worker.plans import Plan
    from worker.runner import AttemptResult, RenderFailed

    attempt = AttemptResult(1, Plan.uniform("fp32", "cpu"), None, error_class=ErrorClass.TIMEOUT)
    failed = RenderFailed([attempt], SoftTimeLimitExceeded(), time_limit_s=600)
    assert "time limit of 600 s (SVDFARM_TASK_SOFT_TIME_LIMIT)" in str(failed)


def test_module_stays_light() -> None:
    # Classifying needs no torch: the web and the CLI import this module too.
    code = (
        "import sys\n"
        "from worker.errors import classify\n"
        "print(classify(MemoryError()).value)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "out_of_memory"
