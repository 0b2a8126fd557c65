"""The evaluator end to end on tiny image folders: cache, scores, metrics, files, errors, gloo."""

import json
import os
import socket

import numpy as np
import pytest
import torch
from hostile import Payload

import mosx
from mosx import evaluate as E
from mosx import metrics as M
from mosx import scores as S
from mosx._io import DiskFull

SIZE = 16


class TinyNet(torch.nn.Module):
    def __init__(self, outputs=3):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, outputs)
        self.calls = 0

    def forward(self, x):
        self.calls += x.shape[0]
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _png(path, rgb, rng):
    from PIL import Image

    arr = np.clip(rng.normal(rgb, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    rng = np.random.default_rng(0)
    colours = {"cat": (200, 40, 40), "dog": (40, 200, 40), "eel": (40, 40, 200)}
    for c, rgb in colours.items():
        os.makedirs(root / "id" / c)
        for i in range(7):
            _png(root / "id" / c / f"{i}.png", rgb, rng)
    os.makedirs(root / "ood_far")
    for i in range(9):
        _png(root / "ood_far" / f"{i}.png", (128, 128, 128), rng)
    (root / "ood_far" / "broken.png").write_bytes(b"not a png at all")
    os.makedirs(root / "near")
    with open(root / "near.txt", "w") as f:
        for i in range(8):
            _png(root / "near" / f"{i}.png", (180, 120, 40), rng)
            f.write(f"near/{i}.png\n")
    os.makedirs(root / "empty")
    return root


def net(outputs=3, seed=0):
    torch.manual_seed(seed)
    return TinyNet(outputs).eval()


def common(tmp_path, **kw):
    return dict(
        out_dir=str(tmp_path / "out"),
        image_size=SIZE,
        batch_size=5,
        workers=0,
        device="cpu",
        precision="fp32",
        progress=False,
        verbose=False,
        **kw,
    )


def load_images(images):
    """The readable images of an image list, as the evaluator's transform makes them: [N, 3, SIZE, SIZE]."""
    tf = E.make_transform(SIZE)
    from PIL import Image

    xs = []
    for p in images.paths:
        try:
            xs.append(tf(Image.open(p).convert("RGB")))
        except Exception:
            continue
    return torch.stack(xs)


def direct_logits(model, images):
    with torch.no_grad():
        return S.model_outputs(model, load_images(images))


def test_flat_model_end_to_end(folders, tmp_path):
    model = net()
    ood = {"far": str(folders / "ood_far"), "near": str(folders / "near.txt")}
    scores = ["msp", "energy", "maxlogit", "gradnorm", "kl_matching", "mahalanobis", "react-energy"]
    res = E.evaluate(model, str(folders / "id"), ood, scores=scores, fit_on_id=True, plots=False, **common(tmp_path))
    assert list(res.metrics) == scores
    assert res.unreadable["far"] == [str(folders / "ood_far" / "broken.png")]
    assert res.counts == {"id": 21, "far": 9, "near": 8}

    # cache contents = the model run directly (fp16 storage)
    id_images = E.image_list(str(folders / "id"), "id")
    z, f = direct_logits(model, id_images)
    msp_direct = S.MSP().score(logits=z.half().float())
    np.testing.assert_allclose(res.scores["msp"]["id"], msp_direct, atol=1e-6)
    z_far, _ = direct_logits(model, E.image_list(str(folders / "ood_far"), "far"))
    want = M.ood_metrics(msp_direct, S.MSP().score(logits=z_far.half().float()))
    assert res.metrics["msp"]["far"].auroc == pytest.approx(want.auroc, abs=1e-9)
    assert res.metrics["msp"]["far"].fpr_at_tpr == pytest.approx(want.fpr_at_tpr, abs=1e-9)
    # accuracy of the flat model: argmax against the folder labels
    labels = torch.tensor(id_images.labels)
    assert res.id_accuracy == pytest.approx(float((z.half().float().argmax(1) == labels).double().mean()))
    av = res.averages["energy"]["auroc"]
    assert av == pytest.approx(np.mean([res.metrics["energy"][o].auroc for o in ood]))

    out = tmp_path / "out"
    doc = json.loads((out / "results.json").read_text())
    assert doc["metrics"]["msp"]["far"]["auroc"] == res.metrics["msp"]["far"].auroc
    assert doc["unreadable"]["far"] and doc["conventions"]["fpr_rule"] == "nearest"
    csv_rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + len(scores) * 3
    # plots from the cache: no second backbone pass
    calls = model.calls
    res2 = E.evaluate(model, str(folders / "id"), ood, scores=["msp", "energy"], **common(tmp_path))
    assert model.calls == calls
    assert res2.metrics["msp"]["near"] == res.metrics["msp"]["near"]
    for m in ("msp", "energy"):
        assert (out / f"roc_{m}.png").stat().st_size > 1000 and (out / f"hist_{m}.png").stat().st_size > 1000
    table = (out / "table.txt").read_text()
    assert "FPR95" in table and "msp" in table and "Average" in table


def test_rerun_reads_the_cache(folders, tmp_path):
    model = net()
    ood = {"far": str(folders / "ood_far")}
    E.evaluate(model, str(folders / "id"), ood, scores=["msp"], plots=False, **common(tmp_path))
    calls = model.calls
    assert calls >= 30
    res = E.evaluate(
        model, str(folders / "id"), ood, scores=["energy:temperature=3", "maxlogit"], plots=False, **common(tmp_path)
    )
    assert model.calls == calls  # no backbone pass the second time
    assert set(res.metrics) == {"energy:temperature=3", "maxlogit"}
    # other weights: a new pass
    with torch.no_grad():
        model.fc.bias += 1
    E.evaluate(model, str(folders / "id"), ood, scores=["msp"], plots=False, **common(tmp_path))
    assert model.calls > calls


def test_grouped_model_and_mos(folders, tmp_path):
    groups = mosx.Groups.from_sizes([2, 1])  # cat, dog | eel: 5 logits
    model = net(groups.num_logits)
    res = E.evaluate(
        model, str(folders / "id"), {"far": str(folders / "ood_far")}, groups=groups, plots=False, **common(tmp_path)
    )
    assert list(res.metrics) == ["mos"] and res.grouped
    z, _ = direct_logits(model, E.image_list(str(folders / "id"), "id"))
    z = z.half().float()
    np.testing.assert_allclose(res.scores["mos"]["id"], mosx.group_softmax_score(z, groups), atol=1e-6)
    pred = mosx.group_predict(z, groups)[0]
    assert res.id_accuracy == pytest.approx(float((pred == torch.arange(3).repeat_interleave(7)).double().mean()))


def test_bad_input_stops_before_work(folders, tmp_path):
    model = net()
    idp, far = str(folders / "id"), {"far": str(folders / "ood_far")}
    with pytest.raises(ValueError, match="no images found"):
        E.evaluate(model, idp, {"e": str(folders / "empty")}, **common(tmp_path))
    with pytest.raises(ValueError, match="at least one OOD set"):
        E.evaluate(model, idp, {}, **common(tmp_path))
    with pytest.raises(ValueError, match="outputs 3 logits but the grouping needs 5"):
        E.evaluate(model, idp, far, groups=[2, 1], **common(tmp_path))
    with pytest.raises(ValueError, match="grouping has 4 classes but the ID folder has 3"):
        E.evaluate(net(6), idp, far, groups=[2, 2], **common(tmp_path))
    with pytest.raises(ValueError, match="out_dir or cache_dir"):
        E.evaluate(model, idp, far, out_dir=None, progress=False)
    with pytest.raises(ValueError, match="class list"):
        E.evaluate(model, idp, far, class_names=["cat", "dog", "emu"], **common(tmp_path))
    with pytest.raises(ValueError, match="fit_data"):
        E.evaluate(model, idp, far, scores=["mahalanobis"], **common(tmp_path))
    with pytest.raises(ValueError, match="flat class logits"):
        E.evaluate(net(5), idp, far, groups=[2, 1], scores=["msp"], **common(tmp_path))
    with pytest.raises(ValueError, match="unknown scorer"):
        E.evaluate(model, idp, far, scores=["magic"], **common(tmp_path))
    assert model.calls == 0


def test_list_file_formats(folders, tmp_path):
    groups = mosx.Groups.from_sizes([2, 1])
    lines = {
        "plain.txt": "id/cat/0.png\n",
        "cls.txt": "id/cat/0.png 0\nid/eel/1.png 2\n",
        "mos.txt": "id/cat/0.png 0 0\nid/eel/1.png 1 0\nid/dog/2.png 0 1\n",
    }
    for n, text in lines.items():
        (folders / n).write_text(text)
    assert E.image_list(str(folders / "plain.txt"), "x").labels == [-1]
    assert E.image_list(str(folders / "cls.txt"), "x").labels == [0, 2]
    assert E.image_list(str(folders / "mos.txt"), "x", groups=groups).labels == [0, 2, 1]
    (folders / "bad.txt").write_text("a.png 1\nb.png\n")
    with pytest.raises(ValueError, match="mix formats"):
        E.image_list(str(folders / "bad.txt"), "x")


def test_score_list_parsing():
    assert E._split_scores("msp,energy:temperature=2,odin:temperature=1000,eps=0.001,maxlogit") == [
        "msp",
        "energy:temperature=2",
        "odin:temperature=1000,eps=0.001",
        "maxlogit",
    ]
    assert E._split_scores("energy:temperature=2;eps=1") == ["energy:temperature=2", "eps=1"]
    assert E._split_scores("") is None


def test_cli(folders, tmp_path):
    model = net()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    out = tmp_path / "cli"
    # a whole pickled module needs pickle to load: only with --trust-pickle (test_pickled_model_is_refused)
    rc = E.main(
        [
            "--model",
            str(path),
            "--id",
            str(folders / "id"),
            "--ood",
            f"far={folders / 'ood_far'}",
            "--ood",
            f"near={folders / 'near.txt'}",
            "--scores",
            "msp,energy:temperature=2,odin:temperature=5,eps=0",
            "--out",
            str(out),
            "--image-size",
            str(SIZE),
            "--workers",
            "0",
            "--device",
            "cpu",
            "--no-progress",
            "--no-plots",
            "--batch-size",
            "4",
            "--trust-pickle",
        ]
    )
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["metrics"]) == {"msp", "energy:temperature=2", "odin:temperature=5,eps=0"}
    assert set(doc["metrics"]["msp"]) == {"far", "near"}
    assert E.main(["--model", str(path), "--id", str(folders / "id"), "--ood", "nonsense", "--out", str(out)]) == 2
    from mosx.cli import main as cli_main

    assert (
        cli_main(
            [
                "eval",
                "--model",
                str(path),
                "--id",
                str(folders / "id"),
                "--ood",
                f"e={folders / 'empty'}",
                "--out",
                str(out),
            ]
        )
        == 2
    )


# ------------------------------------------------------------------------------ distributed (gloo)
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, root, out, result_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    model = net()
    res = E.evaluate(
        model,
        os.path.join(root, "id"),
        {"far": os.path.join(root, "ood_far"), "near": os.path.join(root, "near.txt")},
        scores=["msp", "energy", "odin:temperature=10,eps=0.005"],
        out_dir=out,
        image_size=SIZE,
        batch_size=4,
        workers=0,
        device="cpu",
        precision="fp32",
        progress=False,
        verbose=False,
        plots=False,
    )
    if rank == 0:
        torch.save(
            {
                "scores": res.scores,
                "metrics": {m: {o: v.as_dict() for o, v in p.items()} for m, p in res.metrics.items()},
                "counts": res.counts,
                "unreadable": res.unreadable,
            },
            result_file,
        )
    else:
        assert res is None


def test_distributed_gloo_two_processes(folders, tmp_path):
    import torch.multiprocessing as mp

    result_file = str(tmp_path / "dist.pt")
    # fork: the workers need not import torch again (they use one thread each, so no OpenMP state is
    # inherited in use).
    mp.start_processes(
        _worker,
        args=(2, _free_port(), str(folders), str(tmp_path / "dist"), result_file),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    got = torch.load(result_file, weights_only=False)
    single = E.evaluate(
        net(),
        str(folders / "id"),
        {"far": str(folders / "ood_far"), "near": str(folders / "near.txt")},
        scores=["msp", "energy", "odin:temperature=10,eps=0.005"],
        plots=False,
        **common(tmp_path),
    )
    assert got["counts"] == single.counts and got["unreadable"] == single.unreadable
    for m in ("msp", "energy", "odin:temperature=10,eps=0.005"):
        for s in ("id", "far", "near"):  # every image scored once, in the original order
            np.testing.assert_allclose(got["scores"][m][s], single.scores[m][s], atol=1e-4)
        for o in ("far", "near"):  # metrics over all ranks' images = metrics of the gathered scores
            want = M.ood_metrics(got["scores"][m]["id"], got["scores"][m][o])
            assert got["metrics"][m][o] == want.as_dict()
            assert got["metrics"][m][o]["auroc"] == pytest.approx(single.metrics[m][o].auroc, abs=1e-3)


def test_in_memory_datasets(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x_id = torch.rand(30, 3, SIZE, SIZE, generator=gen)
    y_id = torch.arange(30) % 3
    x_ood = torch.rand(12, 3, SIZE, SIZE, generator=gen) * 0.3
    id_ds = torch.utils.data.TensorDataset(x_id, y_id)
    ood_ds = torch.utils.data.TensorDataset(x_ood)
    model = net()
    res = E.evaluate(
        model, id_ds, {"dark": ood_ds}, scores=["msp", "mahalanobis"], fit_data=id_ds, plots=False, **common(tmp_path)
    )
    with torch.no_grad():
        z, f = S.model_outputs(model, x_id)
        zo, fo = S.model_outputs(model, x_ood)
    msp = S.MSP().score(logits=z.half().float())
    np.testing.assert_allclose(res.scores["msp"]["id"], msp, atol=1e-6)
    maha = S.Mahalanobis().fit(features=f.half().float(), labels=y_id)
    np.testing.assert_allclose(
        res.scores["mahalanobis"]["dark"], maha.score(features=fo.half().float()), rtol=1e-4, atol=1e-4
    )
    assert res.id_accuracy == pytest.approx(float((z.half().float().argmax(1) == y_id).double().mean()))
    calls = model.calls
    E.evaluate(model, id_ds, {"dark": ood_ds}, scores=["energy"], plots=False, **common(tmp_path))
    assert model.calls == calls  # the in-memory data hash hits the cache
    x_ood[0] += 1  # changed data: a new pass over that set
    E.evaluate(model, id_ds, {"dark": ood_ds}, scores=["energy"], plots=False, **common(tmp_path))
    assert model.calls == calls + 12


def test_cli_with_a_trainer_model_file(folders, tmp_path):
    tm = pytest.importorskip("mosx.train.models")
    groups = mosx.Groups.from_sizes([2, 1])
    model, _ = tm.build_model("small-cnn-4", groups.num_logits)
    torch.nn.init.normal_(model.head.weight)
    path = str(tmp_path / "model.pt")
    tm.save_model(
        path,
        model,
        arch="small-cnn-4",
        num_features=model.head.in_features,
        groups=groups,
        loss="group",
        class_names=["cat", "dog", "eel"],
    )
    out = tmp_path / "cli"
    args = [
        "--model",
        path,
        "--id",
        str(folders / "id"),
        "--ood",
        f"far={folders / 'ood_far'}",
        "--out",
        str(out),
        "--image-size",
        str(SIZE),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--no-plots",
    ]
    assert E.main(args) == 0  # grouping and class list come from the file
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["metrics"]) == ["mos"] and doc["grouped_model"] and doc["id_accuracy"] is not None
    (tmp_path / "classes.txt").write_text("cat\ndog\nemu\n")
    assert E.main(args + ["--classes", str(tmp_path / "classes.txt")]) == 2
    assert E.main(args + ["--groups", "1,2"]) == 2


def test_input_perturbation_scorers(folders, tmp_path):
    model = net()
    ood = {"far": str(folders / "ood_far")}
    specs = ["odin:temperature=10,eps=0.01", "mahalanobis:eps=0.01", "mahalanobis"]
    res = E.evaluate(model, str(folders / "id"), ood, scores=specs, fit_on_id=True, plots=False, **common(tmp_path))
    x_id, x_far = (load_images(E.image_list(str(folders / n), n)) for n in ("id", "ood_far"))
    odin = S.ODIN(10, 0.01)
    np.testing.assert_allclose(res.scores[specs[0]]["far"], odin.score(inputs=x_far, model=model), atol=1e-6)
    # fit on exactly the cached fp16 features: this untrained net's features barely vary, so one fp16
    # ulp moves the covariance visibly
    (cache,) = (tmp_path / "out" / "cache").glob("id-*")
    f_id = torch.from_numpy(np.load(cache / "features.npy")).float()
    labels = torch.arange(3).repeat_interleave(7)
    maha = S.Mahalanobis(eps=0.01).fit(features=f_id, labels=labels)
    np.testing.assert_allclose(res.scores[specs[1]]["id"], maha.score(inputs=x_id, model=model), rtol=1e-4, atol=1e-4)
    assert not np.allclose(res.scores[specs[1]]["id"], res.scores[specs[2]]["id"])


def test_cli_grouped_and_flat_models_in_one_table(folders, tmp_path, capsys):
    groups = mosx.Groups.from_sizes([2, 1])
    grouped, flat = net(groups.num_logits, seed=1), net(3, seed=2)
    gpath, fpath = tmp_path / "g.pt", tmp_path / "f.pt"
    torch.save(grouped, gpath)
    torch.save(flat, fpath)
    out = tmp_path / "both"
    rc = E.main(
        [
            "--model",
            str(gpath),
            "--groups",
            "2,1",
            "--flat-model",
            str(fpath),
            "--flat-scores",
            "msp,energy",
            "--id",
            str(folders / "id"),
            "--ood",
            f"far={folders / 'ood_far'}",
            "--out",
            str(out),
            "--image-size",
            str(SIZE),
            "--workers",
            "0",
            "--device",
            "cpu",
            "--no-progress",
            "--no-plots",
            "--precision",
            "fp32",
            "--trust-pickle",
        ]
    )  # whole pickled modules
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ID accuracy (grouped)" in printed and "ID accuracy (flat)" in printed
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["metrics"]) == ["mos", "msp", "energy"]
    assert set(doc["id_accuracy"]) == {"grouped", "flat"}
    single = E.evaluate(
        flat, str(folders / "id"), {"far": str(folders / "ood_far")}, scores=["msp"], plots=False, **common(tmp_path)
    )
    assert doc["metrics"]["msp"]["far"]["auroc"] == pytest.approx(single.metrics["msp"]["far"].auroc, abs=1e-12)
    assert doc["id_accuracy"]["flat"] == pytest.approx(single.id_accuracy)


def test_model_fingerprint_covers_zero_dim_buffers():
    """BatchNorm keeps a 0-dim num_batches_tracked buffer: the fingerprint must hash it (not fail on it)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    before = E.model_fingerprint(model)
    assert before == E.model_fingerprint(model)
    model[1].num_batches_tracked += 1  # only the 0-dim buffer changes
    assert E.model_fingerprint(model) != before


# ------------------------------------------------------------------------------ EvalConfig, safe loading
def test_config_and_keywords_give_the_same_result(folders, tmp_path):
    model = net()
    ood = {"far": str(folders / "ood_far")}
    a = E.evaluate(model, str(folders / "id"), ood, scores=["msp", "energy"], plots=False, **common(tmp_path / "a"))
    cfg = E.EvalConfig(model, str(folders / "id"), ood, scores=["msp", "energy"], plots=False, **common(tmp_path / "b"))
    b = E.evaluate(cfg)
    for m in ("msp", "energy"):
        np.testing.assert_array_equal(a.scores[m]["far"], b.scores[m]["far"])
        assert a.metrics[m]["far"].auroc == b.metrics[m]["far"].auroc
    with pytest.raises(TypeError, match="unknown option"):
        E.evaluate(model, str(folders / "id"), ood, scroes=["msp"], **common(tmp_path))
    with pytest.raises(TypeError, match="either an EvalConfig"):
        E.evaluate(cfg, str(folders / "id"))


def test_cli_builds_the_config_evaluate_takes():
    args = E.build_parser().parse_args(
        [
            "--model",
            "m.pt",
            "--id",
            "val",
            "--ood",
            "a=x",
            "--ood",
            "b=y",
            "--out",
            "o",
            "--scores",
            "msp,energy:temperature=2",
            "--groups",
            "2,3",
            "--no-plots",
        ]
    )
    cfg = E.config_from_args(args)
    assert isinstance(cfg, E.EvalConfig)
    assert cfg.model == "m.pt" and cfg.ood_data == {"a": "x", "b": "y"} and cfg.groups == "2,3"
    assert cfg.scores == ["msp", "energy:temperature=2"] and cfg.plots is False and cfg.trust_pickle is False


def test_pickled_model_is_refused(folders, tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(str(marker))}, evil)
    args = [
        "--model",
        str(evil),
        "--id",
        str(folders / "id"),
        "--ood",
        f"far={folders / 'ood_far'}",
        "--out",
        str(tmp_path / "o"),
        "--image-size",
        str(SIZE),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--no-plots",
    ]
    assert E.main(args) == 2
    assert not marker.exists()
    with pytest.raises(ValueError, match="trust_pickle=True"):
        mosx.load_model(str(evil))
    assert not marker.exists()
    whole = tmp_path / "whole.pt"
    torch.save(net(), whole)
    with pytest.raises(ValueError, match="--trust-pickle"):
        mosx.load_model(str(whole))
    model, info = mosx.load_model(str(whole), trust_pickle=True)
    assert isinstance(model, TinyNet) and info["groups"] is None


# ------------------------------------------------------------------------------ cache faults
def _id_list(folders, tmp_path, shift=0):
    """A list file of the ID images with class ids (shifted by `shift` mod 3: every label edited)."""
    images = E.image_list(str(folders / "id"), "id")
    path = tmp_path / "id.txt"
    path.write_text("".join(f"{p} {(c + shift) % 3}\n" for p, c in zip(images.paths, images.labels)))
    return str(path)


def test_cache_key_covers_the_labels(folders, tmp_path):
    model = net()
    ood = {"far": str(folders / "ood_far")}
    a = E.evaluate(model, _id_list(folders, tmp_path), ood, scores=["msp"], plots=False, **common(tmp_path))
    calls = model.calls
    b = E.evaluate(model, _id_list(folders, tmp_path, shift=1), ood, scores=["msp"], plots=False, **common(tmp_path))
    assert model.calls > calls  # another labelling is another ID set: not the old cache
    assert a.id_accuracy != b.id_accuracy


def test_corrupt_cache_arrays_are_named_and_recomputed(folders, tmp_path):
    model = net()
    ood = {"far": str(folders / "ood_far")}
    ref = E.evaluate(model, str(folders / "id"), ood, scores=["msp"], plots=False, **common(tmp_path))
    (cache,) = (tmp_path / "out" / "cache").glob("id-*")
    z = np.load(cache / "logits.npy")
    np.save(cache / "logits.npy", z + np.float16(1))  # overwritten with other values of the same shape
    calls = model.calls
    with pytest.warns(UserWarning, match=r"logits\.npy: its contents changed"):
        res = E.evaluate(model, str(folders / "id"), ood, scores=["msp"], plots=False, **common(tmp_path))
    assert model.calls > calls
    np.testing.assert_array_equal(res.scores["msp"]["id"], ref.scores["msp"]["id"])
    data = (cache / "features.npy").read_bytes()
    (cache / "features.npy").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.warns(UserWarning, match=r"features\.npy: unreadable"):
        res = E.evaluate(model, str(folders / "id"), ood, scores=["msp"], plots=False, **common(tmp_path))
    np.testing.assert_array_equal(res.scores["msp"]["id"], ref.scores["msp"]["id"])
    calls = model.calls  # healed: the next run reads the cache again
    E.evaluate(model, str(folders / "id"), ood, scores=["msp"], plots=False, **common(tmp_path))
    assert model.calls == calls


def test_short_cache_write_raises_and_leaves_nothing(tmp_path, monkeypatch):
    from mosx.evaluate import cache as C

    real = os.fstat

    class Short:
        def __init__(self, st):
            self.st_size = st.st_size - 1

    monkeypatch.setattr(C.os, "fstat", lambda fd: Short(real(fd)))  # as when the disk fills mid-write
    target = tmp_path / "logits.npy"
    with pytest.raises(OSError, match=r"logits\.npy: could not write the evaluation cache") as e:
        C.save_npy(str(target), np.zeros((4, 3), np.float16))
    assert list(tmp_path.iterdir()) == []
    assert isinstance(e.value, DiskFull) and e.value.errno == 28  # mosx eval: exit 5, "free space, rerun"


# ------------------------------------------------------------------------------ inputs users hit
def test_stray_image_in_a_class_folder_root_is_refused(folders, tmp_path):
    import shutil

    root = tmp_path / "id"
    shutil.copytree(folders / "id", root)
    shutil.copy(folders / "id" / "cat" / "0.png", root / "stray.png")
    with pytest.raises(ValueError, match=r"class folders and also 1 image.*stray\.png"):
        E.evaluate(net(), str(root), {"far": str(folders / "ood_far")}, scores=["msp"], **common(tmp_path))
    # an OOD folder may mix sub-folders and images: every image below it is used
    assert len(E.image_list(str(root), "ood", labeled=False)) == 22


def test_all_unreadable_set_names_it(folders, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"none of the 3 images of set 'bad' could be read"):
        E.evaluate(net(), str(folders / "id"), {"bad": str(bad)}, scores=["msp"], **common(tmp_path))


def test_one_channel_model_file_gets_grey_images(folders, tmp_path):
    from mosx.models import build_model, save_model

    model, _ = build_model("small-cnn-4", 3, in_chans=1)
    torch.nn.init.normal_(model.head.weight)
    path = str(tmp_path / "grey.pt")
    save_model(path, model, arch="small-cnn-4", num_features=model.head.in_features, loss="flat", in_chans=1)
    args = [
        "--model",
        path,
        "--id",
        str(folders / "id"),
        "--ood",
        f"far={folders / 'ood_far'}",
        "--scores",
        "msp",
        "--out",
        str(tmp_path / "o"),
        "--image-size",
        str(SIZE),
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
        "--no-plots",
    ]
    assert E.main(args) == 0  # it crashed mid-pass on 3-channel images before
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert doc["images_scored"]["id"] == 21
    tf = E.make_transform(SIZE, in_chans=1)
    from PIL import Image

    x = tf(Image.open(folders / "id" / "cat" / "0.png").convert("RGB"))
    assert x.shape == (1, SIZE, SIZE)
    with pytest.raises(ValueError, match="one mean and one std"):
        E.make_transform(SIZE, mean=(0.1, 0.2, 0.3), in_chans=1)


# ------------------------------------------------------------------------------ report.html
def test_html_report_is_self_contained(folders, tmp_path):
    res = E.evaluate(
        net(),
        str(folders / "id"),
        {"far": str(folders / "ood_far"), "near": str(folders / "near.txt")},
        scores=["msp", "energy"],
        **common(tmp_path),
    )
    page = (tmp_path / "out" / "report.html").read_text()
    assert res.files["html"] == str(tmp_path / "out" / "report.html")
    assert "<table>" in page and "far" in page and "near" in page and "energy" in page
    assert f"{100 * res.metrics['msp']['far'].auroc:.2f}" in page
    assert page.count("data:image/png;base64,") == 4  # ROC + histogram per method, embedded
    assert 'src="http' not in page and 'href="http' not in page  # nothing fetched: opens offline
    assert "image_size" in page and "torch" in page  # settings and versions


def _chromium():
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_html_report_renders_in_a_browser(folders, tmp_path):
    import subprocess

    from PIL import Image

    E.evaluate(net(), str(folders / "id"), {"far": str(folders / "ood_far")}, scores=["msp"], **common(tmp_path))
    shot = tmp_path / "shot.png"
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,1600",
        f"--screenshot={shot}",
        (tmp_path / "out" / "report.html").as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.std() > 10  # not blank: text, table rules and plots
    assert (img < 128).mean() > 0.005  # some dark pixels (text, curves)


def test_groups_spec_is_the_trainers(folders, tmp_path):
    """mosx eval reads --groups with Groups.parse, as mosx train does: the trainer's spellings work."""
    model = net(5)
    ood = {"far": str(folders / "ood_far")}
    a = E.evaluate(model, str(folders / "id"), ood, groups="2,1", scores=["mos"], plots=False, **common(tmp_path))
    b = E.evaluate(model, str(folders / "id"), ood, groups="sizes:2,1", scores=["mos"], plots=False, **common(tmp_path))
    np.save(tmp_path / "sizes.npy", np.array([2, 1]))
    c = E.evaluate(
        model,
        str(folders / "id"),
        ood,
        groups=str(tmp_path / "sizes.npy"),
        scores=["mos"],
        plots=False,
        **common(tmp_path),
    )
    for r in (b, c):
        np.testing.assert_array_equal(r.scores["mos"]["far"], a.scores["mos"]["far"])
    with pytest.raises(ValueError, match="kmeans"):
        E.evaluate(model, str(folders / "id"), ood, groups="kmeans:2", scores=["mos"], **common(tmp_path))


def test_wrappers_on_a_grouped_model_only_over_mos(folders, tmp_path):
    model = net(5)
    ood = {"far": str(folders / "ood_far")}
    for spec in ("react-msp", "ash-msp:variant=p", "scale-energy", "dice-msp"):
        with pytest.raises(ValueError, match="reads flat class logits"):
            E.evaluate(
                model, str(folders / "id"), ood, groups=[2, 1], scores=[spec], fit_on_id=True, **common(tmp_path)
            )
    res = E.evaluate(
        model,
        str(folders / "id"),
        ood,
        groups=[2, 1],
        scores=["mos", "ash-mos", "scale-mos", "react-mos"],
        fit_on_id=True,
        plots=False,
        **common(tmp_path),
    )
    assert set(res.metrics) == {"mos", "ash-mos", "scale-mos", "react-mos"}


def test_thresholds_and_per_sample_scores_are_written(folders, tmp_path):
    res = E.evaluate(
        net(),
        str(folders / "id"),
        {"far": str(folders / "ood_far")},
        scores=["msp", "energy:temperature=2"],
        plots=False,
        **common(tmp_path),
    )
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    for m in ("msp", "energy:temperature=2"):
        t = doc["thresholds"][m]
        assert t == M.threshold_at_tpr(res.scores[m]["id"], 0.95)
        kept_ood = float((res.scores[m]["far"] >= t).mean())
        assert kept_ood == pytest.approx(res.metrics[m]["far"].fpr_at_tpr)
        for s in ("id", "far"):
            with np.load(doc["score_files"]["files"][s]) as z:
                np.testing.assert_array_equal(z[doc["score_files"]["keys"][m]], res.scores[m][s])


@pytest.mark.parametrize("where", ["fit", "id"])
def test_a_label_past_the_model_is_refused_before_anything_is_sized_by_it(tmp_path, where):
    """A fit label of 2e7 used to make the fitted scores allocate 2e7 class means (20 GB)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(12, 3, SIZE, SIZE, generator=gen)
    y = torch.arange(12) % 3
    bad = y.clone()
    bad[5] = 20_000_000
    good_ds = torch.utils.data.TensorDataset(x, y)
    bad_ds = torch.utils.data.TensorDataset(x, bad)
    id_ds, fit_ds = (good_ds, bad_ds) if where == "fit" else (bad_ds, good_ds)
    name = "fit" if where == "fit" else "ID"
    with pytest.raises(ValueError, match=rf"{name} label 20000000 is not a class of the model \(3 classes"):
        E.evaluate(
            net(), id_ds, {"o": torch.utils.data.TensorDataset(x)}, scores=["mahalanobis"], fit_data=fit_ds,
            plots=False, **common(tmp_path),
        )  # fmt: skip


def test_symlink_loops_in_image_folders_are_not_followed(tmp_path):
    """A directory symlink below a class folder or inside an OOD folder (here: loops back to the
    folder) is not followed: each image is listed once and the listing ends."""
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        os.makedirs(tmp_path / "id" / c / "sub")
        _png(tmp_path / "id" / c / "a.png", (200, 40, 40), rng)
        _png(tmp_path / "id" / c / "sub" / "b.png", (200, 40, 40), rng)
        os.symlink(tmp_path / "id" / c, tmp_path / "id" / c / "sub" / "loop")  # cat/sub/loop -> cat
    os.makedirs(tmp_path / "ood")
    _png(tmp_path / "ood" / "x.png", (9, 9, 9), rng)
    os.symlink(tmp_path / "ood", tmp_path / "ood" / "self")  # ood/self -> ood
    ids = E.image_list(str(tmp_path / "id"), "id")
    assert [os.path.relpath(p, tmp_path / "id") for p in ids.paths] == [
        "cat/a.png",
        "cat/sub/b.png",
        "dog/a.png",
        "dog/sub/b.png",
    ]
    assert ids.labels == [0, 0, 1, 1]
    ood = E.image_list(str(tmp_path / "ood"), "ood", labeled=False)
    assert [os.path.relpath(p, tmp_path / "ood") for p in ood.paths] == ["x.png"]
