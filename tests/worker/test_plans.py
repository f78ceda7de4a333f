"""Dtype plans as plain data: validation, readable names, JSON round trips, keys, copies with
changes, and the ``--dtypes`` parser. Pure logic: torch is never imported here."""

from __future__ import annotations

import json
import sys
import types

import pytest

from worker.plans import (
    COMPONENTS,
    Plan,
    device_type,
    parse_dtypes,
    to_torch_dtype,
)


def mixed() -> Plan:
    """A mixed plan with every knob away from its default."""
    return Plan(
        device="cuda:1",
        image_encoder="bf16",
        unet="bf16",
        vae="fp32",
        decode_chunk_size=2,
        offload="model",
        forward_chunking=True,
        casts=False,
    )


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("dtype", ["fp64", "float16", "BF16", "", "int8"])
def test_bad_dtype_is_refused_naming_component_and_value(component: str, dtype: str) -> None:
    """Each component refuses a dtype it does not know, saying which component and value."""
    dtypes = {"image_encoder": "fp32", "unet": "fp32", "vae": "fp32", component: dtype}
    with pytest.raises(ValueError) as info:
        Plan(device="cpu", **dtypes)
    message = str(info.value)
    assert component in message
    assert repr(dtype) in message
    assert "fp32, bf16, fp16" in message


@pytest.mark.parametrize("device", ["tpu", "gpu", "CUDA", "", "xla:0"])
def test_bad_device_is_refused_naming_it(device: str) -> None:
    """An unknown device is refused, with the value and the known devices."""
    with pytest.raises(ValueError, match="device must be one of cuda, mps, cpu") as info:
        Plan.uniform("fp32", device)
    assert repr(device) in str(info.value)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3", "mps", "cpu"])
def test_known_devices_with_an_index_are_accepted(device: str) -> None:
    """cuda, mps and cpu are accepted, cuda with an index too."""
    assert Plan.uniform("bf16", device).device == device


@pytest.mark.parametrize("offload", ["disk", "Model", "", "full"])
def test_bad_offload_is_refused_naming_it(offload: str) -> None:
    """An unknown offload mode is refused with its value."""
    with pytest.raises(ValueError, match="offload must be one of none, model, sequential") as info:
        Plan.uniform("fp32", "cuda", offload=offload)
    assert repr(offload) in str(info.value)


@pytest.mark.parametrize("chunk", [0, -1, -8])
def test_decode_chunk_below_one_is_refused(chunk: int) -> None:
    """A decode chunk under one frame is refused with the value."""
    with pytest.raises(ValueError, match=f"decode_chunk_size must be at least 1, got {chunk}"):
        Plan.uniform("fp32", "cpu", decode_chunk_size=chunk)


def test_plan_is_frozen() -> None:
    """A plan cannot be changed in place: it is written on an attempt as it ran."""
    plan = Plan.uniform("bf16", "cuda")
    with pytest.raises(AttributeError):
        plan.unet = "fp32"  # type: ignore[misc]


def test_defaults() -> None:
    """A plan decodes 8 frames at a time, no offload, no forward chunking, with casts."""
    plan = Plan.uniform("fp16", "mps")
    assert (plan.decode_chunk_size, plan.offload, plan.forward_chunking, plan.casts) == (
        8,
        "none",
        False,
        True,
    )


def test_dtype_of_refuses_an_unknown_component() -> None:
    """dtype_of names the components it knows when given another."""
    plan = mixed()
    assert [plan.dtype_of(c) for c in COMPONENTS] == ["bf16", "bf16", "fp32"]
    with pytest.raises(ValueError, match="'text_encoder'"):
        plan.dtype_of("text_encoder")


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("device", ["cuda", "mps", "cpu"])
def test_uniform_name(dtype: str, device: str) -> None:
    """A uniform plan is named by its one dtype, its decode chunk and its device."""
    plan = Plan.uniform(dtype, device)
    assert plan.is_uniform
    assert plan.dtypes_name == dtype
    assert plan.name == f"{dtype}, chunk 8 on {device}"


@pytest.mark.parametrize(
    ("image_encoder", "unet", "vae", "expected"),
    [
        ("bf16", "bf16", "fp32", "bf16 unet+enc, fp32 vae"),
        ("fp16", "fp16", "fp32", "fp16 unet+enc, fp32 vae"),
        ("bf16", "fp32", "bf16", "fp32 unet, bf16 enc+vae"),
        ("fp32", "bf16", "bf16", "bf16 unet+vae, fp32 enc"),
        ("fp16", "bf16", "fp32", "bf16 unet, fp16 enc, fp32 vae"),
    ],
)
def test_mixed_dtypes_name(image_encoder: str, unet: str, vae: str, expected: str) -> None:
    """A mixed plan groups components by dtype, the UNet's group first."""
    plan = Plan("cuda", image_encoder, unet, vae)
    assert not plan.is_uniform
    assert plan.dtypes_name == expected
    assert plan.name == f"{expected}, chunk 8 on cuda"


def test_name_from_the_docstring() -> None:
    """The example name in Plan.name's docstring is what such a plan is called."""
    plan = Plan("cuda", "bf16", "bf16", "fp32", decode_chunk_size=4)
    assert plan.name == "bf16 unet+enc, fp32 vae, chunk 4 on cuda"


@pytest.mark.parametrize(
    ("knobs", "expected"),
    [
        ({"decode_chunk_size": 1}, "fp16, chunk 1 on cuda"),
        ({"offload": "model"}, "fp16, chunk 8, model offload on cuda"),
        ({"offload": "sequential"}, "fp16, chunk 8, sequential offload on cuda"),
        ({"forward_chunking": True}, "fp16, chunk 8, ff chunking on cuda"),
        ({"casts": False}, "fp16, chunk 8, no casts on cuda"),
        (
            {
                "decode_chunk_size": 2,
                "offload": "sequential",
                "forward_chunking": True,
                "casts": False,
            },
            "fp16, chunk 2, sequential offload, ff chunking, no casts on cuda",
        ),
    ],
)
def test_knobs_in_name(knobs: dict[str, object], expected: str) -> None:
    """Each knob away from its default shows in the name, in a fixed order."""
    assert Plan.uniform("fp16", "cuda", **knobs).name == expected


def test_mixed_plan_with_every_knob_name() -> None:
    """Dtypes, knobs and an indexed device read together."""
    assert mixed().name == (
        "bf16 unet+enc, fp32 vae, chunk 2, model offload, ff chunking, no casts on cuda:1"
    )


# --- as_dict / from_dict ----------------------------------------------------------------------


def test_as_dict_holds_fields_and_name() -> None:
    """as_dict has every field plus the readable name."""
    assert mixed().as_dict() == {
        "device": "cuda:1",
        "image_encoder": "bf16",
        "unet": "bf16",
        "vae": "fp32",
        "decode_chunk_size": 2,
        "offload": "model",
        "forward_chunking": True,
        "casts": False,
        "name": "bf16 unet+enc, fp32 vae, chunk 2, model offload, ff chunking, no casts on cuda:1",
    }


@pytest.mark.parametrize(
    "plan",
    [
        Plan.uniform("fp32", "cpu"),
        Plan.uniform("bf16", "cuda", decode_chunk_size=1, offload="sequential"),
        Plan("mps", "fp16", "fp16", "fp32", forward_chunking=True),
        mixed(),
    ],
    ids=lambda plan: plan.name,
)
def test_round_trip_through_json(plan: Plan) -> None:
    """A plan written as JSON on an attempt reads back equal, the stored name ignored."""
    text = json.dumps(plan.as_dict())
    back = Plan.from_dict(json.loads(text))
    assert back == plan
    assert back.key() == plan.key()
    assert back.name == plan.name


def test_from_dict_ignores_extra_keys_and_fills_defaults() -> None:
    """from_dict drops keys that are not fields and defaults the knobs left out."""
    data = {"device": "cpu", "image_encoder": "fp32", "unet": "fp32", "vae": "fp32"}
    plan = Plan.from_dict({**data, "name": "stale name", "reason": "anything"})
    assert plan == Plan.uniform("fp32", "cpu")


def test_from_dict_validates() -> None:
    """A stored plan with a bad dtype is refused on the way back in."""
    data = {**Plan.uniform("bf16", "cuda").as_dict(), "vae": "fp8"}
    with pytest.raises(ValueError, match="vae dtype .* got 'fp8'"):
        Plan.from_dict(data)


# --- key, with_changes, all_fp32 --------------------------------------------------------------


def test_equal_plans_have_equal_keys() -> None:
    """Two plans built apart but equal have equal, hashable keys."""
    a = Plan("cuda", "bf16", "bf16", "fp32", decode_chunk_size=4)
    b = Plan.uniform("bf16", "cuda", decode_chunk_size=4).with_changes(vae="fp32")
    assert a == b
    assert a.key() == b.key()
    assert len({a.key(), b.key()}) == 1


@pytest.mark.parametrize(
    "changes",
    [
        {"device": "cuda:1"},
        {"image_encoder": "fp32"},
        {"unet": "fp16"},
        {"vae": "fp32"},
        {"decode_chunk_size": 4},
        {"offload": "model"},
        {"forward_chunking": True},
        {"casts": False},
    ],
)
def test_any_difference_changes_the_key(changes: dict[str, object]) -> None:
    """Plans differing in any one field have different keys."""
    plan = Plan.uniform("bf16", "cuda")
    assert plan.with_changes(**changes).key() != plan.key()


def test_with_changes_copies() -> None:
    """with_changes returns a new plan and leaves the original as it was."""
    plan = Plan.uniform("bf16", "cuda")
    changed = plan.with_changes(unet="fp32", decode_chunk_size=2)
    assert changed == Plan("cuda", "bf16", "fp32", "bf16", decode_chunk_size=2)
    assert plan == Plan.uniform("bf16", "cuda")


def test_with_changes_validates() -> None:
    """with_changes refuses the same bad values the constructor does."""
    with pytest.raises(ValueError, match="'fp64'"):
        Plan.uniform("bf16", "cuda").with_changes(unet="fp64")
    with pytest.raises(ValueError, match="decode_chunk_size"):
        Plan.uniform("bf16", "cuda").with_changes(decode_chunk_size=0)


def test_all_fp32_keeps_device_and_knobs() -> None:
    """all_fp32 changes only the dtypes."""
    assert mixed().all_fp32() == Plan(
        device="cuda:1",
        image_encoder="fp32",
        unet="fp32",
        vae="fp32",
        decode_chunk_size=2,
        offload="model",
        forward_chunking=True,
        casts=False,
    )
    fp32 = Plan.uniform("fp32", "cpu")
    assert fp32.all_fp32() == fp32


# --- parse_dtypes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "image_encoder=bf16,unet=fp32,vae=bf16",
            {"image_encoder": "bf16", "unet": "fp32", "vae": "bf16"},
        ),
        ("vae=fp32", {"vae": "fp32"}),
        (" unet = FP16 , vae=Fp32 ", {"unet": "fp16", "vae": "fp32"}),
        ("vae=fp32,", {"vae": "fp32"}),
        (",,unet=bf16,,", {"unet": "bf16"}),
        ("unet=bf16,unet=fp32", {"unet": "fp32"}),
        ("", {}),
        ("  ", {}),
    ],
)
def test_parse_dtypes_good(text: str, expected: dict[str, str]) -> None:
    """Any subset of components parses, loosely spaced and cased; the last one given wins."""
    assert parse_dtypes(text) == expected


@pytest.mark.parametrize(
    ("text", "bad_item"),
    [
        ("unet", "unet"),
        ("unet:fp32", "unet:fp32"),
        ("vae=fp32,text_encoder=fp16", "text_encoder=fp16"),
        ("unet=fp8", "unet=fp8"),
        ("unet=", "unet="),
        ("=fp32", "=fp32"),
        ("image_encoder=bf16;vae=fp32", "image_encoder=bf16;vae=fp32"),
    ],
)
def test_parse_dtypes_bad_names_the_item(text: str, bad_item: str) -> None:
    """A bad override is refused naming the bad item and what is allowed."""
    with pytest.raises(ValueError) as info:
        parse_dtypes(text)
    message = str(info.value)
    assert repr(bad_item) in message
    assert "image_encoder, unet, vae" in message
    assert "fp32, bf16, fp16" in message


def test_parsed_dtypes_apply_to_a_plan() -> None:
    """What parse_dtypes returns is what with_changes takes."""
    plan = Plan.uniform("bf16", "cuda").with_changes(**parse_dtypes("vae=fp32"))
    assert plan.name == "bf16 unet+enc, fp32 vae, chunk 8 on cuda"


# --- device_type, to_torch_dtype --------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "expected"), [("cuda", "cuda"), ("cuda:2", "cuda"), ("mps", "mps"), ("cpu", "cpu")]
)
def test_device_type_drops_the_index(device: str, expected: str) -> None:
    """device_type strips ``:N``."""
    assert device_type(device) == expected


@pytest.fixture
def fake_torch(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A stand-in torch module with the three dtypes: importing real torch costs seconds."""
    module = types.ModuleType("torch")
    module.float32 = "torch.float32"  # type: ignore[attr-defined]
    module.bfloat16 = "torch.bfloat16"  # type: ignore[attr-defined]
    module.float16 = "torch.float16"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", module)
    return module


def test_to_torch_dtype_maps_each_name(fake_torch: types.ModuleType) -> None:
    """fp32 / bf16 / fp16 map to torch's float32 / bfloat16 / float16."""
    assert [to_torch_dtype(d) for d in ("fp32", "bf16", "fp16")] == [
        fake_torch.float32,
        fake_torch.bfloat16,
        fake_torch.float16,
    ]
    assert Plan("cpu", "fp16", "bf16", "fp32").torch_dtype("unet") == fake_torch.bfloat16


def test_to_torch_dtype_refuses_unknown(fake_torch: types.ModuleType) -> None:
    """An unknown dtype name is refused with its value."""
    with pytest.raises(ValueError, match="got 'fp64'"):
        to_torch_dtype("fp64")
