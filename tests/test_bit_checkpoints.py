"""The official MOS checkpoints (finetune.py's {"step", "model", "optim"}) and flat BiT-PyTorch state
dicts, read by mosx.load_model onto timm's ResNetV2 and checked against an independently written
BiT ResNet-V2 (tests/bit_reference.py) with random weights: same logits."""

import os

import numpy as np
import pytest
import torch
import torch.serialization as ts
from bit_reference import DEPTHS, BiTResNetV2, randomise

import mosx
from mosx.models import bit

TINY = (1, 1, 1, 1)  # one unit per block: every kind of key, depth-generic mapping, fast


def reference(units, wf=1, head=13, layout="mos", gen=None, conv_std=None, in_chans=3):
    gen = gen if gen is not None else torch.Generator().manual_seed(0)
    return randomise(BiTResNetV2(units, wf, head, layout, in_chans=in_chans), gen, conv_std).eval()


def save_like_finetune(model, path, *, on_gpu=True, step=10, lr=0.003):
    """What the MOS reference's finetune.py writes: the DataParallel state dict (module. prefix) and
    the SGD state (momentum 0.9, head trained), its tensors stored as CUDA tensors."""
    opt = torch.optim.SGD(model.head.parameters(), lr=0.003, momentum=0.9)
    model.head.conv(torch.randn(2, model.head.conv.in_channels, 1, 1)).square().mean().backward()
    opt.step()  # momentum buffers in the state, as after any step of the real run
    for group in opt.param_groups:
        group["lr"] = lr
    ckpt = {"step": step, "model": {"module." + k: v for k, v in model.state_dict().items()}, "optim": opt.state_dict()}
    model.zero_grad(set_to_none=True)
    if not on_gpu:
        torch.save(ckpt, path)
        return
    tag = ts.location_tag
    ts.location_tag = lambda storage: "cuda:0"  # the storages of a file written on a GPU
    try:
        torch.save(ckpt, path)
    finally:
        ts.location_tag = tag


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def check_same_logits(ref, model, gen, size=32, batch=3, f32=True):
    """float64: the mapping is exact up to float64 rounding (a wrong epsilon, layer or stride would
    show at 1e-6 and above); float32: same logits to float32 rounding."""
    x = torch.randn(batch, ref.root.conv.in_channels, size, size, generator=gen)
    if f32:
        torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        logits(model.double(), x.double()), logits(ref.double(), x.double()), rtol=1e-10, atol=1e-10
    )
    ref.float(), model.float()


def test_finetune_checkpoint_from_gpu(tmp_path, gen):
    ref = reference(TINY, head=13, gen=gen)
    path = str(tmp_path / "bit.pth.tar")
    save_like_finetune(ref, path)
    if not torch.cuda.is_available():  # the file really names CUDA storages: it needs map_location here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    torch.load(path, weights_only=True, map_location="cpu")  # tensors and plain types only: no pickle needed
    model, info = mosx.load_model(path)
    assert info["step"] == 10 and info["num_outputs"] == 13 and info["in_chans"] == 3 and info["groups"] is None
    assert type(model).__name__ == "ResNetV2"
    eps = {m.eps for m in model.modules() if hasattr(m, "eps") and type(m).__name__ == "StdConv2d"}
    assert eps == {1e-10}
    check_same_logits(ref, model, gen)


@pytest.mark.parametrize("prefix,layout", [("", "bit"), ("module.", "mos")])
def test_flat_state_dicts(tmp_path, gen, layout, prefix):
    """A bare BiT-PyTorch ResNetV2 state dict (BiT-S weights saved from PyTorch, a flat-softmax
    model), with or without DataParallel's prefix; MOS names the head norm before_head.gn,
    BiT-PyTorch head.gn. Width 2 and 1-channel input: the layout is read from the file."""
    ref = reference((1, 2, 1, 1), wf=2, head=7, layout=layout, gen=gen, in_chans=1)
    path = str(tmp_path / "flat.pt")
    torch.save({prefix + k: v for k, v in ref.state_dict().items()}, path)
    model, info = mosx.load_model(path)
    assert info["in_chans"] == 1 and info["num_outputs"] == 7 and info["step"] is None
    check_same_logits(ref, model, gen)


def test_r50_registered_timm_model_and_arch(tmp_path, gen):
    """R50x1: the file gives timm's registered resnetv2_50x1_bit; --arch in either spelling agrees."""
    ref = reference(DEPTHS[50], head=11, gen=gen)
    path = str(tmp_path / "r50.pth.tar")
    save_like_finetune(ref, path, on_gpu=False)
    model, info = mosx.load_model(path)
    assert info["arch"] == "resnetv2_50x1_bit" and info["num_outputs"] == 11
    check_same_logits(ref, model, gen, f32=False)  # 16 units deep: float32 differs by rounding alone
    model, info = mosx.load_model("BiT-S-R50x1", weights=path)  # a name with --weights takes the same path
    assert info["arch"] == "resnetv2_50x1_bit"
    check_same_logits(ref, model, gen, f32=False)
    with pytest.raises(ValueError, match="R101x1 but the file holds a BiT R50x1"):
        mosx.load_model(path, arch="BiT-S-R101x1")
    with pytest.raises(ValueError, match="not a BiT architecture"):
        mosx.load_model(path, arch="resnet50")
    with pytest.raises(ValueError, match="num_classes=1000 but the checkpoint's head has 11"):
        mosx.load_model(path, num_classes=1000)


@pytest.mark.slow
def test_r101x1_the_paper_backbone(tmp_path, gen):
    """BiT-S-R101x1 with MOS's 1008-wide taxonomy head, float64 at 32x32."""
    ref = reference(DEPTHS[101], head=1008, gen=gen)
    path = str(tmp_path / "r101.pth.tar")
    save_like_finetune(ref, path)
    model, info = mosx.load_model(path)
    assert info["arch"] == "resnetv2_101x1_bit" and info["num_outputs"] == 1008
    check_same_logits(ref, model, gen, batch=2, f32=False)


def test_arch_names():
    assert bit.parse_arch("BiT-S-R101x1") == (101, 1) and bit.parse_arch("bit-m-r50x3") == (50, 3)
    assert bit.parse_arch("R152x2") == (152, 2) and bit.parse_arch("resnetv2_101x1_bit") == (101, 1)
    assert bit.parse_arch("resnetv2_50x1_bit.goog_in21k_ft_in1k") == (50, 1)
    assert bit.parse_arch("resnet50") is None and bit.parse_arch("resnetv2_50") is None
    assert bit.timm_name(DEPTHS[101], 1) == "resnetv2_101x1_bit" and bit.timm_name(TINY, 1) is None


def test_the_epsilon_matters(tmp_path, gen):
    """Weights of small variance: timm's BiT epsilon (1e-8) gives other logits, the reference's
    (1e-10, which the loader sets) the same."""
    ref = reference(TINY, head=5, gen=gen, conv_std=1e-4)
    path = str(tmp_path / "small.pt")
    torch.save(ref.state_dict(), path)
    model, _ = mosx.load_model(path)
    x = torch.randn(2, 3, 32, 32, generator=gen)
    torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=1e-5, atol=1e-5)
    assert bit.use_reference_eps(model, 1e-8) > 0
    assert (logits(model, x) - logits(ref, x)).abs().max() > 1e-2


def test_bad_checkpoints(tmp_path, gen):
    ref = reference(TINY, head=5, gen=gen)
    sd = {"module." + k: v for k, v in ref.state_dict().items()}
    extra = dict(sd, **{"module.body.block2.unit01.se.fc.weight": torch.zeros(1), "module.aux.weight": torch.zeros(1)})
    torch.save({"step": 1, "model": extra, "optim": {}}, tmp_path / "extra.pt")
    with pytest.raises(
        ValueError, match=r"2 key\(s\).*match no layer.*body\.block2\.unit01\.se\.fc\.weight, aux\.weight"
    ):
        mosx.load_model(str(tmp_path / "extra.pt"))
    lacking = {k: v for k, v in sd.items() if "block3.unit01.downsample" not in k}
    torch.save({"step": 1, "model": lacking, "optim": {}}, tmp_path / "lacking.pt")
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\).*body\.block3\.unit01\.downsample\.weight"):
        mosx.load_model(str(tmp_path / "lacking.pt"))
    wrong = dict(sd, **{"module.body.block1.unit01.conv2.weight": torch.zeros(64, 64, 1, 1)})
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="(?s)does not fit timm's ResNetV2.*conv2"):
        mosx.load_model(str(tmp_path / "wrong.pt"))
    gap = {k: v for k, v in sd.items() if ".block4." not in k}
    torch.save(gap, tmp_path / "gap.pt")
    with pytest.raises(ValueError, match="block1..block4"):
        mosx.load_model(str(tmp_path / "gap.pt"))


def test_pickle_in_optim_is_refused_unless_trusted(tmp_path, gen):
    """finetune.py's optimizer state holds Python floats (weights_only loads it); a file whose optim
    holds numpy scalars needs pickle and gets the --trust-pickle message."""
    ref = reference(TINY, head=5, gen=gen)
    path = str(tmp_path / "np.pt")
    save_like_finetune(ref, path, on_gpu=False, lr=np.float64(0.003))
    with pytest.raises(ValueError, match="trust-pickle"):
        mosx.load_model(path)
    model, _ = mosx.load_model(path, trust_pickle=True)
    check_same_logits(ref, model, gen)


def _png(path, rgb, rng):
    from PIL import Image

    Image.fromarray(np.clip(rng.normal(rgb, 30, (24, 24, 3)), 0, 255).astype(np.uint8)).save(path)


def test_evaluate_an_official_checkpoint(tmp_path, gen):
    """The evaluator takes the file as it is; a head width that matches no grouping stops it."""
    from mosx import evaluate as E

    rng = np.random.default_rng(0)
    for c, rgb in {"a": (200, 40, 40), "b": (40, 200, 40), "c": (40, 40, 200)}.items():
        os.makedirs(tmp_path / "id" / c)
        for i in range(3):
            _png(tmp_path / "id" / c / f"{i}.png", rgb, rng)
    os.makedirs(tmp_path / "ood")
    for i in range(3):
        _png(tmp_path / "ood" / f"{i}.png", (128, 128, 128), rng)
    path = str(tmp_path / "bit.pth.tar")
    save_like_finetune(reference(TINY, head=5, gen=gen), path)  # 3 classes in groups [2, 1]: 5 logits
    opts = dict(
        image_size=32,
        batch_size=4,
        workers=0,
        device="cpu",
        precision="fp32",
        progress=False,
        verbose=False,
        plots=False,
    )
    with pytest.raises(ValueError, match="outputs 5 logits but the grouping needs 6"):
        E.evaluate(
            path,
            str(tmp_path / "id"),
            {"ood": str(tmp_path / "ood")},
            groups=[1, 1, 1],
            out_dir=str(tmp_path / "bad"),
            **opts,
        )
    res = E.evaluate(
        path, str(tmp_path / "id"), {"ood": str(tmp_path / "ood")}, groups=[2, 1], out_dir=str(tmp_path / "out"), **opts
    )
    assert res is not None


def test_trainer_backbone_uses_the_reference_epsilon():
    """The backbone mosx train builds for a BiT name (fine-tuning from BiT .npz weights, as the MOS
    paper does) standardises with the reference's 1e-10 too, not timm's 1e-8."""
    from timm.layers import StdConv2d

    from mosx.models.backbones import build_backbone

    net, dim = build_backbone("resnetv2_50x1_bit")
    eps = {m.eps for m in net.modules() if isinstance(m, StdConv2d)}
    assert eps == {bit.REFERENCE_WS_EPS} and dim == 2048
    plain, _ = build_backbone("resnetv2_50")  # not a BiT model: timm's own layers, untouched
    assert not any(isinstance(m, StdConv2d) and m.eps == bit.REFERENCE_WS_EPS for m in plain.modules())


def test_npz_models_use_the_reference_epsilon(tmp_path, monkeypatch):
    """load_model of a BiT .npz sets eps 1e-10 on every StdConv2d (the weights themselves are read by
    timm's own npz loader, tested in test_train.py::test_bit_npz_through_timm; stubbed here)."""
    import timm.models.resnetv2 as rv2
    from timm.layers import StdConv2d

    calls = []
    monkeypatch.setattr(rv2.ResNetV2, "load_pretrained", lambda self, path, prefix="": calls.append(path))
    path = tmp_path / "BiT-S-R50x1.npz"
    path.write_bytes(b"stub")
    model, info = mosx.load_model(str(path), arch="resnetv2_50x1_bit", num_classes=7)
    assert calls == [str(path)]
    assert {m.eps for m in model.modules() if isinstance(m, StdConv2d)} == {bit.REFERENCE_WS_EPS}
    with pytest.raises(ValueError, match="needs --arch"):
        mosx.load_model(str(path))
