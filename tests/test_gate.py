"""mosx.OODGate: calibration against mosx.metrics, save / load, torch.export and ONNX parity."""

import importlib.util
import os

import numpy as np
import pytest
import torch
from torch import nn

import mosx
import mosx.metrics as M
from mosx import scores as S
from mosx.export import export_onnx, export_pt2
from mosx.models import build_model, save_model

HAVE_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None
needs_ort = pytest.mark.skipif(
    not HAVE_ORT,
    reason="ONNX export tests need onnx, onnxscript and onnxruntime (pip install onnx onnxruntime onnxscript)",
)

# Uneven groups, one of a single class, classes of a group not contiguous: 11 classes, 4 groups.
ASSIGNMENT = [0, 2, 0, 1, 2, 2, 3, 2, 3, 0, 2]
SIZE = 16  # image side


def grouped_model(groups, seed=0, arch="small-cnn-4"):
    torch.manual_seed(seed)
    model, _ = build_model(arch, groups.num_logits, head_init="random")
    with torch.no_grad():  # spread the logits so groups and classes are told apart clearly
        model.head.weight.mul_(20)
        model.head.bias.normal_(0, 1)
    return model.eval()


def images(gen, n):
    return torch.randn(n, 3, SIZE, SIZE, generator=gen)


@pytest.fixture(scope="module")
def groups():
    return mosx.Groups.from_assignment(ASSIGNMENT)


@pytest.fixture(scope="module")
def grouped_gate(groups):
    g = torch.Generator().manual_seed(1)
    model = grouped_model(groups)
    loader = [images(g, 7), (images(g, 9), torch.zeros(9)), {"image": images(g, 8)}]
    return mosx.OODGate.calibrate(model, loader, scorer="mos", groups=groups, tpr=0.9)


@pytest.fixture(scope="module")
def flat_gate():
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(3)
    model, _ = build_model("small-cnn-4", 6, head_init="random")
    with torch.no_grad():
        model.head.weight.mul_(20)
    model.eval()
    return mosx.OODGate.calibrate(model, [images(g, 12), images(g, 12)], scorer="energy:temperature=2", tpr=0.95)


# ------------------------------------------------------------------------------ the gate
def test_grouped_gate_outputs(grouped_gate, groups, gen):
    x = images(gen, 10)
    with torch.no_grad():
        out = grouped_gate(x)
        z = grouped_gate.model(x)
    pred, conf = mosx.group_predict(z, groups)
    assert out._fields == ("pred", "conf", "score", "is_ood")
    assert torch.equal(out.pred, pred) and torch.equal(out.conf, conf)
    assert torch.equal(out.score, S.MOS(groups).score(logits=z))
    assert torch.equal(out.is_ood, out.score.double() < float(grouped_gate.threshold))
    assert out.pred.dtype == torch.int64 and out.is_ood.dtype == torch.bool
    assert grouped_gate.scorer == "mos" and grouped_gate.grouped


@pytest.mark.parametrize(
    "spec, scorer",
    [
        ("msp", S.MSP()),
        ("maxlogit", S.MaxLogit()),
        ("energy", S.Energy()),
        ("energy:temperature=2", S.Energy(2.0)),
        ("odin:temperature=1000", S.ODIN(1000.0)),
        ("entropy", S.Entropy()),
        ("gen", S.GEN()),
        ("gen:gamma=0.5,M=3", S.GEN(0.5, 3)),
    ],
)
def test_flat_gate_scores_are_the_scorers(spec, scorer, gen):
    torch.manual_seed(0)
    model, _ = build_model("small-cnn-4", 5, head_init="random")
    model.eval()
    x = images(gen, 6)
    gate = mosx.OODGate(model, spec, threshold=0.0)
    gate2 = mosx.OODGate(model, scorer, threshold=0.0)  # a Scorer object works the same
    assert gate.scorer == gate2.scorer
    with torch.no_grad():
        out, z = gate(x), model(x)
    assert torch.equal(out.score, scorer.score(logits=z))
    assert torch.equal(out.pred, z.argmax(1))
    assert torch.equal(out.conf, torch.softmax(z, 1).amax(1))


def test_calibration_matches_ood_metrics(grouped_gate, gen):
    # Recompute the calibration scores and score an OOD set: the gate's TPR on the calibration
    # data and its FPR on the OOD set are the operating point ood_metrics reports.
    g = torch.Generator().manual_seed(1)
    cal = torch.cat([images(g, 7), images(g, 9), images(g, 8)])
    ood = images(gen, 40) * 3
    with torch.no_grad():
        a, b = grouped_gate(cal), grouped_gate(ood)
    c = grouped_gate.calibration
    assert c["num_images"] == 24 and c["kept"] == int((~a.is_ood).sum())
    assert float(grouped_gate.threshold) == M.threshold_at_tpr(a.score, 0.9)
    kept_ood = float((~b.is_ood).double().mean())
    assert kept_ood == M.ood_metrics(a.score, b.score, tpr=0.9).fpr_at_tpr
    fpr, tpr, _ = M.roc_curve(a.score, b.score)
    assert bool(((tpr == c["measured_tpr"]) & (fpr == kept_ood)).any())


def test_calibrate_from_a_model_file(tmp_path, groups, gen):
    model = grouped_model(groups, seed=5)
    path = str(tmp_path / "model.pt")
    save_model(
        path,
        model,
        arch="small-cnn-4",
        num_features=model.head.in_features,
        groups=groups,
        loss="group",
        class_names=[f"c{i}" for i in range(groups.num_classes)],
    )
    loader = [images(gen, 10)]
    gate = mosx.OODGate.calibrate(path, loader, tpr=0.8)  # groups and scorer "mos" from the file
    assert gate.groups == groups and gate.scorer == "mos"
    gate2 = mosx.OODGate.calibrate(mosx.load_model(path), loader, tpr=0.8)  # load_model's (model, info)
    assert gate2.groups == groups and float(gate2.threshold) == float(gate.threshold)
    out = str(tmp_path / "gate.pt")
    gate.save(out)
    d = torch.load(out, weights_only=True)
    assert d["format"] == "mosx.gate/1" and d["model"]["class_names"] == [f"c{i}" for i in range(11)]
    loaded, info = mosx.load_model(out)
    assert info["class_names"] == d["model"]["class_names"] and info["gate"]["scorer"] == "mos"


# ------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("which", ["grouped", "flat"])
def test_save_load_round_trip(which, grouped_gate, flat_gate, tmp_path, gen):
    gate = grouped_gate if which == "grouped" else flat_gate
    path = str(tmp_path / "gate.pt")
    gate.save(path)
    d = torch.load(path, weights_only=True)  # plain types and tensors only
    assert d["format"] == mosx.gate.GATE_FORMAT and d["model"]["format"] == "mosx.model/1"
    assert d["model"]["arch"] == "small-cnn-4" and d["tpr"] == gate.tpr
    loaded, info = mosx.load_model(path)
    assert isinstance(loaded, mosx.OODGate) and not loaded.training
    assert mosx.OODGate.load(path).scorer == gate.scorer
    assert loaded.scorer == gate.scorer and loaded.groups == gate.groups and info["groups"] == gate.groups
    assert float(loaded.threshold) == float(gate.threshold) and loaded.calibration == gate.calibration
    x = images(gen, 5)
    with torch.no_grad():
        for u, v in zip(gate(x), loaded(x)):
            assert torch.equal(u, v)


def test_save_needs_a_mosx_model(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 4))
    gate = mosx.OODGate(net, "msp", threshold=0.5)
    with pytest.raises(ValueError, match="not a mosx model"):
        gate.save(str(tmp_path / "g.pt"))
    with pytest.raises(ValueError, match="no threshold"):
        mosx.OODGate(build_model("small-cnn-4", 3)[0], "msp").save(str(tmp_path / "g.pt"))
    with pytest.raises(ValueError, match="not a gate file"):
        path = str(tmp_path / "m.pt")
        m, _ = build_model("small-cnn-4", 3)
        save_model(path, m, arch="small-cnn-4", num_features=16, loss="flat")
        mosx.OODGate.load(path)


# ------------------------------------------------------------------------------ bad input
def test_bad_input(groups, gen):
    model = grouped_model(groups)
    loader = [images(gen, 4)]
    with pytest.raises(ValueError, match="no images"):
        mosx.OODGate.calibrate(model, [], groups=groups)
    with pytest.raises(ValueError, match="no images"):
        mosx.OODGate.calibrate(model, [torch.zeros(0, 3, SIZE, SIZE)], groups=groups)
    for tpr in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"tpr must be a number in \(0, 1\]"):
            mosx.OODGate.calibrate(model, loader, groups=groups, tpr=tpr)
    wrong = mosx.Groups.from_sizes([5, 5])  # 12 logits, the model has 15
    with pytest.raises(ValueError, match="outputs 15 logits but the grouping needs 12"):
        mosx.OODGate.calibrate(model, loader, groups=wrong)
    headless = nn.Sequential(model.backbone, nn.Linear(16, 13))  # width known only from the logits
    with pytest.raises(ValueError, match="outputs 13 logits but the grouping needs 15"):
        mosx.OODGate.calibrate(headless, loader, groups=groups)
    with pytest.raises(ValueError, match="mos scorer needs the model's grouping"):
        mosx.OODGate.calibrate(model, loader)
    with pytest.raises(ValueError, match="reads flat class logits but the model is grouped"):
        mosx.OODGate.calibrate(model, loader, scorer="msp", groups=groups)
    with pytest.raises(TypeError, match="loader batch"):
        mosx.OODGate.calibrate(model, [[1, 2]], groups=groups)
    with pytest.raises(ValueError, match="already a gate"):
        mosx.OODGate.calibrate(mosx.OODGate(model, "mos", groups=groups), loader)


@pytest.mark.parametrize(
    "spec, why",
    [
        ("mahalanobis", "needs statistics fitted on ID data"),
        ("kl_matching", "needs statistics fitted on ID data"),
        ("react-energy", "needs statistics fitted on ID data"),
        ("odin:temperature=1000,eps=0.001", "perturbs the input"),
        ("gradnorm", "reads"),
    ],
)
def test_unsupported_scorers_are_refused(spec, why):
    model, _ = build_model("small-cnn-4", 5)
    with pytest.raises(ValueError, match=why) as e:
        mosx.OODGate(model, spec, threshold=0.0)
    assert "mos, msp, maxlogit, energy" in str(e.value)


# ------------------------------------------------------------------------------ export
def check_outputs(eager, other, threshold, tol=1e-5):
    """pred, conf, score to float32 rounding; is_ood equal wherever the score is not within
    rounding of the threshold (there the float32 score may round either way)."""
    pred, conf, score, is_ood = (torch.as_tensor(np.asarray(o)) if not torch.is_tensor(o) else o for o in other)
    assert torch.equal(pred, eager.pred)
    torch.testing.assert_close(conf, eager.conf, rtol=tol, atol=tol)
    torch.testing.assert_close(score, eager.score, rtol=tol, atol=tol)
    clear = (eager.score.double() - threshold).abs() > tol
    assert torch.equal(is_ood[clear], eager.is_ood[clear])
    return max(float((conf - eager.conf).abs().max()), float((score - eager.score).abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["grouped", "flat"])
def test_export_pt2(which, grouped_gate, flat_gate, tmp_path, gen):
    gate = grouped_gate if which == "grouped" else flat_gate
    path = str(tmp_path / "gate.pt2")
    ep = export_pt2(gate, path, images(gen, 2))
    if which == "grouped":
        targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
        assert "mosx.group_predict.default" in targets and "mosx.group_softmax_score.default" in targets
    loaded = torch.export.load(path).module()
    x = images(gen, 9)  # another batch size: the batch dimension is dynamic
    with torch.no_grad():
        eager = gate(x)
        out = loaded(x)
    for u, v in zip(eager, out):
        assert torch.equal(u, v)


def _onnx_session(path):
    import onnx
    import onnxruntime as ort

    m = onnx.load(path)
    domains = {n.domain for n in m.graph.node} | {o.domain for o in m.opset_import if o.domain != "ai.onnx"}
    assert domains <= {""}, f"non-standard ONNX domains in the graph: {domains}"
    assert not m.functions, "the graph should be plain standard ops, no local functions"
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


@needs_ort
@pytest.mark.slow
@pytest.mark.parametrize("which", ["grouped", "flat"])
def test_export_onnx_matches_eager(which, grouped_gate, flat_gate, tmp_path, gen):
    gate = grouped_gate if which == "grouped" else flat_gate
    path = str(tmp_path / "gate.onnx")
    export_onnx(gate, path, images(gen, 2))
    sess = _onnx_session(path)
    assert [o.name for o in sess.get_outputs()] == ["pred", "conf", "score", "is_ood"]
    for n in (1, 33):  # the batch dimension is dynamic
        x = images(gen, n)
        with torch.no_grad():
            eager = gate(x)
        res = sess.run(None, {"images": x.numpy()})
        diff = check_outputs(eager, res, float(gate.threshold))
        print(f"{which} n={n}: max |eager - onnxruntime| = {diff:.3g}")


@needs_ort
def test_onnx_translations_of_the_ops(groups, gen, tmp_path):
    # The mosx ops on logits alone, ties included (equal logits: first index wins, as the kernels).
    class Ops(nn.Module):
        def forward(self, z):
            score = mosx.group_softmax_score(z, groups)
            cls, prob, grp = mosx.group_predict(z, groups, return_group=True)
            return score, cls, prob, grp, mosx.group_softmax(z, groups), mosx.group_log_softmax(z, groups)

    z = torch.randn(50, groups.num_logits, generator=gen) * 4
    z[:10] = torch.round(z[:10])  # many exact ties within and across groups
    z[10:12] = 0.0
    path = str(tmp_path / "ops.onnx")
    export_onnx(Ops(), path, z[:3], groups=groups)
    res = _onnx_session(path).run(None, {"images": z.numpy()})
    eager = Ops()(z)
    for name, u, v in zip(("score", "class", "prob", "group", "softmax", "log_softmax"), eager, res):
        v = torch.from_numpy(v)
        if u.dtype == torch.int64:
            assert torch.equal(u, v), name
        else:
            torch.testing.assert_close(v, u.detach(), rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------ command line
def _write_images(folder, gen, n):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        px = (torch.rand(SIZE, SIZE, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(os.path.join(folder, f"{i}.png"))


@pytest.mark.slow
def test_cli_calibrates_and_exports(tmp_path, groups, gen, capsys):
    from mosx.cli import main

    model = grouped_model(groups)
    mpath = str(tmp_path / "model.pt")
    save_model(mpath, model, arch="small-cnn-4", num_features=16, groups=groups, loss="group")
    _write_images(str(tmp_path / "id" / "a"), gen, 6)
    _write_images(str(tmp_path / "id" / "b"), gen, 5)
    gpath, out = str(tmp_path / "gate.pt"), str(tmp_path / "gate.pt2")
    rc = main(
        [
            "export",
            "--model",
            mpath,
            "--calibrate",
            str(tmp_path / "id"),
            "--tpr",
            "0.9",
            "--image-size",
            str(SIZE),
            "--format",
            "pt2",
            "--out",
            out,
            "--save-gate",
            gpath,
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert "calibrated mos on 11 images" in capsys.readouterr().out
    gate = mosx.OODGate.load(gpath)
    assert gate.calibration["num_images"] == 11 and gate.tpr == 0.9
    assert os.path.getsize(out) > 0
    # A model file without --calibrate, and --calibrate on a gate file: clear errors.
    assert main(["export", "--model", mpath, "--format", "pt2", "--out", out]) == 2
    assert "--calibrate ID_FOLDER" in capsys.readouterr().err
    assert main(["export", "--model", gpath, "--calibrate", str(tmp_path / "id"), "--format", "pt2", "--out", out]) == 2
    assert "already calibrated" in capsys.readouterr().err


@needs_ort
@pytest.mark.slow
@pytest.mark.parametrize("spec", ["entropy", "gen:gamma=0.1,M=4"])
def test_entropy_and_gen_gates_export_to_onnx(spec, tmp_path, gen):
    """The entropy and GEN formulas written into the gate export as standard ONNX ops (topk included)."""
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(5)
    model, _ = build_model("small-cnn-4", 6, head_init="random")
    model.eval()
    gate = mosx.OODGate.calibrate(model, [images(g, 12)], scorer=spec, tpr=0.9)
    path = str(tmp_path / "gate.onnx")
    export_onnx(gate, path, images(gen, 2))
    x = images(gen, 5)
    with torch.no_grad():
        eager = gate(x)
    check_outputs(eager, _onnx_session(path).run(None, {"images": x.numpy()}), float(gate.threshold))
