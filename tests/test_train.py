"""Tests of the reference trainer (mosx.train): schedule, mixup, labels and groupings, checkpoints,
exact resume after SIGKILL, DDP on gloo, the feature cache, and `mosx train` end to end.

Runs use tiny models and data with one CPU thread so they are fast and bit-reproducible.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hostile import Payload

import mosx
from mosx.train import load_model, make_config, train
from mosx.train.checkpoint import atomic_save
from mosx.train.data import ImageData, RecipeTransform, StepBatchSampler
from mosx.train.grouping import kmeans, random_groups, resolve_groups, taxonomy_groups
from mosx.train.loop import make_loss
from mosx.train.mixup import Mixup, mix_inputs
from mosx.train.schedule import lr_at

# A tiny recipe: 4-wide small CNN, 8x8 tensors cropped to 6, batch 8, one thread, no workers.
TINY = dict(
    model="small-cnn-4",
    batch_size=8,
    resize=0,
    crop=6,
    eval_resize=0,
    warmup_steps=3,
    milestones=(10,),
    steps=16,
    log_every=4,
    ckpt_every=4,
    threads=1,
    workers=0,
    progress=False,
    amp="off",
    seed=3,
)


def tiny_data(gen, n=48, classes=4, size=8):
    return torch.rand(n, 3, size, size, generator=gen), torch.arange(n) % classes


def states_equal(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def subprocess_env():
    """The environment of a `python -m mosx.cli` child: one thread; the installed mosx (conftest keeps
    the working directory off sys.path)."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


# ---------------------------------------------------------------------- schedule
def test_schedule_warmup_then_steps():
    base, warm, ms = 0.003, 500, (6000, 12000, 18000)
    assert lr_at(0, base, warm, ms) == pytest.approx(base / 500)
    assert lr_at(249, base, warm, ms) == pytest.approx(base * 250 / 500)
    assert lr_at(499, base, warm, ms) == pytest.approx(base)
    assert lr_at(500, base, warm, ms) == pytest.approx(base)
    assert lr_at(5999, base, warm, ms) == pytest.approx(base)
    assert lr_at(6000, base, warm, ms) == pytest.approx(base / 10)
    assert lr_at(11999, base, warm, ms) == pytest.approx(base / 10)
    assert lr_at(12000, base, warm, ms) == pytest.approx(base / 100)
    assert lr_at(19999, base, warm, ms) == pytest.approx(base / 1000)
    # warm-up is linear and increasing
    w = [lr_at(s, base, warm, ms) for s in range(warm)]
    assert np.allclose(np.diff(w), base / warm)
    assert lr_at(3, 1.0, 0, ()) == 1.0
    with pytest.raises(ValueError):
        lr_at(-1, base, warm, ms)


def test_paper_preset_is_the_reference_recipe():
    c = make_config()
    assert (c.lr, c.momentum, c.weight_decay, c.batch_size, c.warmup_steps) == (0.003, 0.9, 0.0, 512, 500)
    assert tuple(c.milestones) == (6000, 12000, 18000) and c.steps == 20000 and c.mixup_alpha == 0.1
    assert (c.resize, c.crop, c.eval_resize, c.flip) == (512, 480, 480, True)
    assert c.model == "resnetv2_101x1_bit" and c.train_blocks == 0
    assert make_config("paper-flat").loss == "flat"
    with pytest.raises(ValueError, match="unknown training setting"):
        make_config(lrr=1)
    with pytest.raises(ValueError, match="frozen backbone"):
        make_config(cache_features=True, train_blocks=2)


# ---------------------------------------------------------------------- mixup
def test_mixup_draws_beta_lambda_and_permutation():
    m = Mixup(0.1, seed=5)
    ref = np.random.Generator(np.random.PCG64(5))
    for _ in range(5):
        lam, perm = m.draw(7)
        assert lam == ref.beta(0.1, 0.1)
        assert perm.tolist() == ref.permutation(7).tolist()
    lams = [Mixup(0.1, seed=s).draw(2)[0] for s in range(400)]
    # Beta(0.1, 0.1) is U-shaped and symmetric: most draws lie near 0 or 1
    assert np.mean([(v < 0.1) or (v > 0.9) for v in lams]) > 0.7
    assert 0.35 < np.mean(lams) < 0.65
    assert Mixup(0.0).draw(4) == (1.0, None)
    # state round trip continues the same stream
    a = Mixup(0.1, seed=9)
    a.draw(3)
    b = Mixup(0.1, seed=0)
    b.load_state_dict(a.state_dict())
    la, pa = a.draw(5)
    lb, pb = b.draw(5)
    assert la == lb and torch.equal(pa, pb)


def test_mix_inputs(gen):
    x = torch.randn(6, 3, 4, 4, generator=gen)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    got = mix_inputs(x.clone(), 0.3, perm)
    assert torch.allclose(got, 0.3 * x + 0.7 * x[perm], atol=1e-6)
    assert mix_inputs(x, 0.3, None) is x


def plain_group_ce(logits, y, groups):
    labels = groups.group_labels(y)
    total = 0.0
    for k, (a, b) in enumerate(groups.slices.tolist()):
        total = total + F.cross_entropy(logits[:, a:b], labels[:, k])
    return total


def test_mixup_losses_mix_targets(gen):
    groups = mosx.Groups.from_sizes([3, 2, 4])
    logits = torch.randn(8, groups.num_logits, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 9, (8,), generator=gen)
    perm = torch.randperm(8, generator=gen)
    lam = 0.27
    got = make_loss("group", groups)(logits, y, lam, perm)
    want = lam * plain_group_ce(logits, y, groups) + (1 - lam) * plain_group_ce(logits, y[perm], groups)
    assert torch.allclose(got.double(), want, atol=1e-6)
    flat = torch.randn(8, 9, generator=gen, dtype=torch.float64)
    soft = lam * F.one_hot(y, 9).double() + (1 - lam) * F.one_hot(y[perm], 9).double()
    assert torch.allclose(make_loss("flat")(flat, y, lam, perm).double(), F.cross_entropy(flat, soft), atol=1e-6)


# ---------------------------------------------------------------------- data, labels and groupings
def test_list_file_labels(tmp_path):
    from PIL import Image

    lines = []
    entries = [
        ("dogs/a.png", 1, 0),
        ("cats/b.png", 0, 1),
        ("cars/c.png", 1, 1),
        ("owls/d.png", 0, 0),
        ("dogs/e.png", 1, 0),
    ]
    for rel, g, j in entries:
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        Image.new("RGB", (5, 5)).save(tmp_path / rel)
        lines.append(f"{rel} {g} {j}")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    d = ImageData.from_list_file(str(tmp_path / "train.txt"))
    g = resolve_groups("list", d)
    assert g.sizes == (2, 2)
    # classes numbered group by group: (0,0)->0, (0,1)->1, (1,0)->2, (1,1)->3
    assert d.targets == [2, 1, 3, 0, 2]
    assert d.class_names == ["owls", "cats", "dogs", "cars"]
    labels = g.group_labels(torch.tensor(d.targets))
    for (rel, grp, j), row in zip(entries, labels.tolist()):
        assert row[grp] == j + 1 and row[1 - grp] == 0
    assert d.samples[0][0] == str(tmp_path / "dogs/a.png")


def test_taxonomy_random_and_sizes_groupings(tmp_path):
    names = ["cat", "oak", "dog", "fern", "owl"]
    tax = tmp_path / "tax.txt"
    tax.write_text("# class group\ncat animal\noak plant life\ndog animal\nfern plant life\nowl animal\nx unused\n")

    class D:
        num_classes, class_names, list_groups, targets = 5, names, None, []

    g = taxonomy_groups(str(tax), names)
    assert g.class_to_group == (0, 1, 0, 1, 0) and g.num_logits == 7
    assert resolve_groups(f"taxonomy:{tax}", D) == g
    tax.write_text("cat animal\n")
    with pytest.raises(ValueError, match="no group for class"):
        taxonomy_groups(str(tax), names)
    r = random_groups(10, 3, seed=1)
    assert sorted(r.sizes) == [3, 3, 4] and r == random_groups(10, 3, seed=1)
    assert r != random_groups(10, 3, seed=2) or r != random_groups(10, 3, seed=3)
    assert resolve_groups("sizes:2,3", D).sizes == (2, 3)
    with pytest.raises(ValueError, match="the grouping has 4 classes"):
        resolve_groups("sizes:2,2", D)
    js = tmp_path / "g.json"
    g.save(str(js))
    assert resolve_groups(str(js), D) == g


def test_kmeans_matches_sklearn_on_separated_clusters(gen):
    sklearn = pytest.importorskip("sklearn.cluster")
    from sklearn.metrics import adjusted_rand_score

    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    truth = torch.arange(40) % 4
    x = centres[truth] + 0.5 * torch.randn(40, 2, generator=gen)
    ours = kmeans(x, 4, seed=0)
    theirs = sklearn.KMeans(4, n_init=5, random_state=0).fit_predict(x.numpy())
    assert adjusted_rand_score(truth.numpy(), ours.numpy()) == 1.0
    assert adjusted_rand_score(theirs, ours.numpy()) == 1.0
    # never an empty group, even with duplicated points
    dup = torch.zeros(6, 3)
    dup[3:] = 1.0
    assert torch.bincount(kmeans(dup, 4, seed=0), minlength=4).min() >= 1


def test_kmeans_grouping_uses_backbone_class_means(gen):
    # features given directly (identity backbone): classes 0,2 near one point, 1,3 near another
    feats = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.1, 0.0], [5.0, 5.1]])
    y = torch.arange(40) % 4
    x = feats[y] + 0.01 * torch.randn(40, 2, generator=gen)
    cfg = make_config(**{**TINY, "model": "identity", "steps": 0, "groups": "kmeans:2", "out": "unused"})
    from mosx.train.data import open_data

    d = open_data((x, y))
    g = resolve_groups(cfg.groups, d, lambda idx: x[idx], seed=0)
    assert g.class_to_group[0] == g.class_to_group[2] != g.class_to_group[1] == g.class_to_group[3]


def test_transform_crop_flip_normalise():
    img = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)[0]
    t = RecipeTransform(True, 0, 4, True, (0.5,) * 3, (0.5,) * 3, 0)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a, b = t(img, g1), t(img, g2)
    assert a.shape == (3, 4, 4) and torch.equal(a, b)
    full = (img.float() / 255 - 0.5) / 0.5
    # the output is a 4x4 window of the normalised image, possibly flipped
    windows = [full[:, i : i + 4, j : j + 4] for i in range(3) for j in range(3)]
    assert any(torch.allclose(a, w) or torch.allclose(a, w.flip(-1)) for w in windows)
    e = RecipeTransform(False, 0, 4, True, (0.5,) * 3, (0.5,) * 3, 0)(img)
    assert torch.allclose(e, full)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("train_mode", [True, False])
def test_batched_tensor_path_equals_per_item_path(gen, dtype, train_mode):
    from mosx.train.data import KeyedDataset, TensorData, tensor_batch

    x = torch.randint(0, 256, (10, 1, 9, 9), generator=gen).to(dtype)
    data = TensorData(x, torch.arange(10) % 3)
    tf = RecipeTransform(train_mode, 12, 10, True, (0.5,) * 3, (0.25,) * 3, 11)
    keys = [(i, e) for e in (0, 1) for i in (3, 1, 4, 1, 5, 9)]
    ds = KeyedDataset(data, tf, seed=7)
    want = torch.utils.data.default_collate([ds[k] for k in keys])
    got = tensor_batch(data, tf, 7, keys)
    assert got[0].shape == want[0].shape and torch.equal(got[1], want[1])
    assert torch.allclose(got[0], want[0], atol=1e-5)


def test_open_data_accepts_image_sets_and_datasets(gen):
    from mosx.train.data import DatasetData, TensorData, open_data

    class ImageSetLike(torch.utils.data.Dataset):  # the shape of mosx.data.ImageSet
        def __init__(self):
            self.images = torch.randint(0, 256, (6, 1, 5, 5), generator=gen, dtype=torch.uint8)
            self.labels = torch.tensor([0, 1, 2, 0, 1, 2])

        def __len__(self):
            return 6

        def __getitem__(self, i):
            return self.images[i].float() / 255, self.labels[i]

    s = ImageSetLike()
    d = open_data(s)
    assert isinstance(d, TensorData) and d.x.dtype == torch.uint8 and d.num_classes == 3
    generic = torch.utils.data.Subset(s, [0, 1, 2, 3])
    g = open_data(generic)
    assert isinstance(g, DatasetData) and g.targets == [0, 1, 2, 0] and g.num_classes == 3
    assert torch.equal(g.load(2)[0], s[2][0])
    with pytest.raises(ValueError, match="x has 6 samples but y has 5"):
        open_data((s.images, s.labels[:5]))
    with pytest.raises(FileNotFoundError):
        open_data("/nonexistent/data")


def test_step_sampler_partitions_global_batches():
    one = StepBatchSampler(20, 8, 4, 1, 0, seed=1, steps=5)
    two = [StepBatchSampler(20, 8, 4, 2, r, seed=1, steps=5) for r in range(2)]
    a = list(one)
    b0, b1 = list(two[0]), list(two[1])
    assert len(a) == 10 and len(b0) == 5
    for s in range(5):  # accumulation chunk r of one process == rank r
        assert a[2 * s] == b0[s] and a[2 * s + 1] == b1[s]
    # each epoch (2 steps of 8 out of 20) uses distinct samples
    e0 = [i for mb in a[:4] for i, _ in mb]
    assert len(set(e0)) == 16 and all(ep == 0 for mb in a[:4] for _, ep in mb)
    assert {ep for mb in a[4:8] for _, ep in mb} == {1}
    resumed = list(StepBatchSampler(20, 8, 4, 1, 0, seed=1, steps=5, start_step=3))
    assert resumed == a[6:]


# ---------------------------------------------------------------------- checkpoints
def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    atomic_save({"v": torch.ones(3)}, str(path))

    def broken_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save({"v": torch.zeros(3)}, str(path))
    monkeypatch.undo()
    assert torch.equal(torch.load(str(path))["v"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_resume_after_sigkill_is_bit_identical(tmp_path, gen):
    x, y = tiny_data(gen)
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    steps = 20
    cfg = make_config("cpu-demo", **{**TINY, "steps": steps, "groups": "sizes:2,2", "data": str(tmp_path / "d.pt")})
    ref = train(cfg.replace(out=str(tmp_path / "ref")))

    out = tmp_path / "killed"
    args = [
        sys.executable,
        "-m",
        "mosx.cli",
        "train",
        "--preset",
        "cpu-demo",
        "--model",
        "small-cnn-4",
        "--data",
        str(tmp_path / "d.pt"),
        "--groups",
        "sizes:2,2",
        "--batch-size",
        "8",
        "--resize",
        "0",
        "--crop",
        "6",
        "--eval-resize",
        "0",
        "--warmup-steps",
        "3",
        "--milestones",
        "10",
        "--steps",
        str(steps),
        "--log-every",
        "4",
        "--ckpt-every",
        "4",
        "--threads",
        "1",
        "--workers",
        "0",
        "--progress",
        "off",
        "--amp",
        "off",
        "--seed",
        "3",
        "--out",
        str(out),
        "--step-sleep",
        "0.25",
    ]
    proc = subprocess.Popen(args, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    ck = out / "checkpoint.pt"
    deadline = time.time() + 90
    while not ck.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    log = proc.communicate()[0].decode()
    assert ck.exists(), log
    assert proc.returncode == -signal.SIGKILL, log
    step_at_kill = torch.load(ck, weights_only=False)["step"]
    assert 0 < step_at_kill < steps
    assert not (out / "model.pt").exists()

    res = train(cfg.replace(out=str(out), resume=True))
    assert res.resumed_from == step_at_kill
    a = torch.load(tmp_path / "ref" / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(out / "model.pt", weights_only=False)["state_dict"]
    assert states_equal(a, b)
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == steps
    logged = [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(4, steps + 1, 4))  # nothing twice, nothing missing
    # the logged losses after the resume point match too
    assert [v for s, v in res.losses if s > step_at_kill] == [v for s, v in ref.losses if s > step_at_kill]
    # the run did learn something: weights moved from their initial values
    assert a["head.weight"].abs().sum() > 0


def test_ddp_gloo_two_processes_equal_one_process(tmp_path, gen):
    x, y = tiny_data(gen)
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    steps = 6
    cfg = make_config(
        "cpu-demo",
        **{
            **TINY,
            "steps": steps,
            "groups": "sizes:2,2",
            "micro_batch": 4,
            "data": str(tmp_path / "d.pt"),
            "ckpt_every": 0,
            "out": str(tmp_path / "one"),
        },
    )
    one = train(cfg)  # one process, accumulating 2 micro-batches of 4
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "mosx.cli",
        "train",
        "--preset",
        "cpu-demo",
        "--model",
        "small-cnn-4",
        "--data",
        str(tmp_path / "d.pt"),
        "--groups",
        "sizes:2,2",
        "--batch-size",
        "8",
        "--micro-batch",
        "4",
        "--resize",
        "0",
        "--crop",
        "6",
        "--eval-resize",
        "0",
        "--warmup-steps",
        "3",
        "--milestones",
        "10",
        "--steps",
        str(steps),
        "--log-every",
        "4",
        "--ckpt-every",
        "0",
        "--threads",
        "1",
        "--workers",
        "0",
        "--progress",
        "off",
        "--amp",
        "off",
        "--seed",
        "3",
        "--out",
        str(tmp_path / "two"),
    ]
    r = subprocess.run(args, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "two" / "model.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert one.losses and a["head.weight"].abs().sum() > 0


# ---------------------------------------------------------------------- frozen backbone, models
def test_feature_cache_matches_full_pipeline_when_frozen(tmp_path, gen):
    # No mixup and no augmentation: the head sees the same features either way, so the head
    # trained on the cache must equal the head trained through the frozen backbone.
    x, y = tiny_data(gen)
    base = {
        **TINY,
        "train_blocks": 0,
        "mixup_alpha": 0.0,
        "crop": 0,
        "flip": False,
        "steps": 8,
        "groups": "sizes:2,2",
        "ckpt_every": 0,
        "lr": 0.5,
    }
    full = train(make_config("cpu-demo", **base, out=str(tmp_path / "full")), data=(x, y))
    cached = train(make_config("cpu-demo", **base, cache_features=True, out=str(tmp_path / "cache")), data=(x, y))
    assert torch.equal(
        cached.model.head.weight.detach(),
        torch.load(tmp_path / "cache" / "model.pt", weights_only=False)["state_dict"]["head.weight"],
    )
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "cache" / "model.pt", weights_only=False)["state_dict"]
    assert torch.equal(a["backbone.stages.0.0.weight"], b["backbone.stages.0.0.weight"])
    assert torch.allclose(a["head.weight"], b["head.weight"], atol=1e-5)
    assert a["head.weight"].abs().sum() > 0
    assert [s for s, _ in full.losses] == [s for s, _ in cached.losses]
    assert np.allclose([v for _, v in full.losses], [v for _, v in cached.losses], atol=1e-5)
    assert cached.cache_seconds is not None


def test_bf16_autocast_on_cpu_and_partial_backbone(tmp_path, gen):
    x, y = tiny_data(gen)
    r = train(
        make_config(
            "cpu-demo",
            **{
                **TINY,
                "steps": 3,
                "amp": "bf16",
                "train_blocks": 1,
                "loss": "flat",
                "ckpt_every": 0,
                "out": str(tmp_path / "bf16"),
            },
        ),
        data=(x, y),
    )
    assert np.isfinite(r.final_loss)
    st = torch.load(tmp_path / "bf16" / "model.pt", weights_only=False)["state_dict"]
    init, _ = build_model_for_check()
    # the first stage is frozen (same as its seeded initial value), the last one trained
    assert torch.equal(st["backbone.stages.0.0.weight"], init.backbone.stages[0][0].weight)
    assert not torch.equal(st["backbone.stages.3.0.weight"], init.backbone.stages[3][0].weight)


def build_model_for_check():
    from mosx.train.models import build_model

    torch.manual_seed(TINY["seed"])
    return build_model("small-cnn-4", 4)


def test_head_zero_init_and_frozen_backbone(tmp_path, gen):
    from mosx.train.models import build_model, set_trainable

    model, _ = build_model("small-cnn-4", 7)
    assert model.head.weight.abs().sum() == 0 and model.head.bias.abs().sum() == 0
    trainable = set_trainable(model, 0)
    assert trainable == list(model.head.parameters())
    set_trainable(model, 1)
    assert all(p.requires_grad for p in model.backbone.stages[-1].parameters())
    assert not any(p.requires_grad for p in model.backbone.stages[0].parameters())
    with pytest.raises(ValueError, match="blocks"):
        set_trainable(model, 9)


def test_plain_cnn_shapes_blocks_and_round_trip(tmp_path):
    from mosx.train.models import PlainCNN, backbone_blocks, build_model, save_model, set_trainable

    torch.manual_seed(0)
    model, _ = build_model("plain-cnn-4", 6, in_chans=1)
    net = model.backbone
    assert isinstance(net, PlainCNN) and net.num_features == 64 and model.head.in_features == 64
    model.eval()
    x = torch.randn(3, 1, 32, 32)
    # at 32x32 the 4x4 average pool is a no-op: features = fc(flatten(stages(x)))
    manual = net.fc(net.stages(x).flatten(1))
    assert torch.allclose(net(x), manual, atol=1e-6)
    for size in (16, 12, 8):  # other sizes pool to the same 4x4 layout
        assert model(torch.randn(2, 1, size, size)).shape == (2, 6)
    assert len(backbone_blocks(net)) == 4  # three conv stages and the feature layer
    set_trainable(model, 1)
    assert all(p.requires_grad for p in net.fc.parameters())
    assert not any(p.requires_grad for s in net.stages for p in s.parameters())
    model.train()
    model(torch.randn(8, 1, 32, 32))  # moves the BatchNorm running statistics
    model.eval()
    save_model(str(tmp_path / "m.pt"), model, arch="plain-cnn-4", num_features=64, loss="flat", in_chans=1)
    back, info = load_model(str(tmp_path / "m.pt"))
    assert info["arch"] == "plain-cnn-4" and torch.equal(back.eval()(x), model(x))


def test_head_init_zero_or_random(tmp_path, gen):
    from mosx.train.models import Classifier, build_model

    zero, _ = build_model("small-cnn-4", 7)
    rand, _ = build_model("small-cnn-4", 7, head_init="random")
    assert zero.head.weight.abs().sum() == 0 and zero.head.bias.abs().sum() == 0
    assert rand.head.weight.abs().sum() > 0 and rand.head.bias.abs().sum() > 0
    with pytest.raises(ValueError, match="head_init"):
        Classifier(torch.nn.Identity(), 4, 3, head_init="ones")
    with pytest.raises(ValueError, match="head_init"):
        make_config("cpu-demo", head_init="ones")
    # why "random" exists: from scratch, a zero head passes the backbone no gradient at the first step
    x, y = torch.rand(8, 3, 8, 8, generator=gen), torch.arange(8) % 7
    for model, moves in ((zero, False), (rand, True)):
        F.cross_entropy(model(x), y).backward()
        grad = sum(float(p.grad.abs().sum()) for p in model.backbone.parameters())
        assert (grad > 0) == moves
    # the trainer builds the head as configured (a near-zero lr keeps the first step's head)
    data = tiny_data(gen)
    heads = {}
    for init in ("zero", "random"):
        cfg = make_config(
            "cpu-demo",
            **{**TINY, "steps": 1, "lr": 1e-12, "mixup_alpha": 0.0, "ckpt_every": 0},
            loss="flat",
            head_init=init,
            out=str(tmp_path / init),
        )
        heads[init] = train(cfg, data=data).model.head.weight.detach()
    assert heads["zero"].abs().max() < 1e-9 and heads["random"].abs().max() > 1e-3


def test_load_local_weights(tmp_path):
    from mosx.train.models import build_backbone, build_model, load_backbone_weights

    src, _ = build_backbone("small-cnn-4")
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}, tmp_path / "w.pth")
    dst, info = build_model("small-cnn-4", 5, weights=str(tmp_path / "w.pth"))
    assert states_equal(src.state_dict(), dst.backbone.state_dict()) and not info["missing"]
    torch.save({"other": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="no tensor matches"):
        load_backbone_weights(dst.backbone, str(tmp_path / "bad.pth"))
    (tmp_path / "x.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="ResNetV2"):
        load_backbone_weights(dst.backbone, str(tmp_path / "x.npz"))


def test_bit_npz_through_timm(tmp_path):
    pytest.importorskip("timm")
    from timm.models.resnetv2 import ResNetV2

    from mosx.train.models import load_backbone_weights

    # A tiny ResNetV2 written in BiT's TensorFlow naming, read back through timm's npz loader.
    net = ResNetV2(layers=(1, 1), channels=(128, 256), num_classes=0, stem_chs=32, width_factor=1)
    g = torch.Generator().manual_seed(0)
    arrays = {}
    hwio = lambda w: w.permute(2, 3, 1, 0).numpy()
    arrays["resnet/root_block/standardized_conv2d/kernel"] = hwio(torch.randn(net.stem.conv.weight.shape, generator=g))
    arrays["resnet/group_norm/gamma"] = torch.rand(net.norm.weight.shape, generator=g).numpy()
    arrays["resnet/group_norm/beta"] = torch.rand(net.norm.bias.shape, generator=g).numpy()
    for i, stage in enumerate(net.stages):
        for j, block in enumerate(stage.blocks):
            p = f"resnet/block{i + 1}/unit{j + 1:02d}/"
            for part, conv, norm in (
                ("a", block.conv1, block.norm1),
                ("b", block.conv2, block.norm2),
                ("c", block.conv3, block.norm3),
            ):
                arrays[p + f"{part}/standardized_conv2d/kernel"] = hwio(torch.randn(conv.weight.shape, generator=g))
                arrays[p + f"{part}/group_norm/gamma"] = torch.rand(norm.weight.shape, generator=g).numpy()
                arrays[p + f"{part}/group_norm/beta"] = torch.rand(norm.bias.shape, generator=g).numpy()
            if block.downsample is not None:
                arrays[p + "a/proj/standardized_conv2d/kernel"] = hwio(
                    torch.randn(block.downsample.conv.weight.shape, generator=g)
                )
    np.savez(tmp_path / "bit.npz", **arrays)
    load_backbone_weights(net, str(tmp_path / "bit.npz"))
    want = torch.from_numpy(arrays["resnet/block1/unit01/b/standardized_conv2d/kernel"]).permute(3, 2, 0, 1)
    assert torch.equal(net.stages[0].blocks[0].conv2.weight.detach(), want)


# ---------------------------------------------------------------------- end to end
def test_mosx_train_cli_on_image_folder(tmp_path):
    from PIL import Image

    from mosx.cli import main

    rng = np.random.default_rng(0)
    for c, colour in enumerate([(220, 30, 30), (30, 220, 30), (30, 30, 220)]):
        d = tmp_path / "imgs" / f"class{c}"
        d.mkdir(parents=True)
        for i in range(6):
            arr = np.clip(np.array(colour) + rng.integers(-20, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--preset",
            "cpu-demo",
            "--model",
            "small-cnn-4",
            "--data",
            str(tmp_path / "imgs"),
            "--val-data",
            str(tmp_path / "imgs"),
            "--groups",
            "random:2",
            "--batch-size",
            "6",
            "--steps",
            "5",
            "--resize",
            "10",
            "--crop",
            "8",
            "--eval-resize",
            "8",
            "--warmup-steps",
            "2",
            "--milestones",
            "4",
            "--log-every",
            "2",
            "--ckpt-every",
            "3",
            "--threads",
            "1",
            "--progress",
            "off",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    for name in ("checkpoint.pt", "model.pt", "groups.json", "config.json", "log.jsonl"):
        assert (out / name).exists(), name
    model, info = load_model(str(out / "model.pt"))
    assert info["groups"].num_classes == 3 and info["class_names"] == ["class0", "class1", "class2"]
    logits = model.eval()(torch.zeros(2, 3, 8, 8))
    assert logits.shape == (2, info["groups"].num_logits)
    lines = (out / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(np.isfinite(eval(l.replace("null", "None"))["loss"]) for l in lines)
    assert main(["train", "--preset", "cpu-demo", "--loss", "nope"]) == 2


# ---------------------------------------------------------------------- Unleashing Mask options
def need_unleash():
    """The UM tests need mosx.unleash and a mosx._C built with the masked_weight op."""
    import importlib.util

    if importlib.util.find_spec("mosx.unleash") is None:
        pytest.skip("mosx.unleash is not there")
    try:
        torch.ops.mosx.masked_weight
    except (AttributeError, RuntimeError):
        pytest.skip("this mosx._C build has no masked_weight op (rebuild the extension)")


def _trained_model(tmp_path, x, y, loss="group"):
    cfg = make_config(
        "cpu-demo",
        **{
            **TINY,
            "steps": 6,
            "groups": "sizes:2,2",
            "loss": loss,
            "ckpt_every": 0,
            "out": str(tmp_path / f"base_{loss}"),
        },
    )
    train(cfg, data=(x, y))
    return str(tmp_path / f"base_{loss}" / "model.pt")


@pytest.mark.parametrize("loss", ["group", "flat"])
def test_flooding_above_the_loss_reverses_the_first_step(tmp_path, gen, loss):
    need_unleash()
    x, y = tiny_data(gen)
    init = _trained_model(tmp_path, x, y, loss)
    base = {
        **TINY,
        "steps": 1,
        "warmup_steps": 0,
        "train_blocks": 0,
        "groups": "sizes:2,2",
        "loss": loss,
        "ckpt_every": 0,
        "init": init,
        "mixup_alpha": 0.0,
    }
    plain = train(make_config("cpu-demo", **base, out=str(tmp_path / "plain")), data=(x, y))
    flooded = train(make_config("cpu-demo", **base, um_flood_level=1e3, out=str(tmp_path / "flood")), data=(x, y))
    w0 = torch.load(init, weights_only=False)["state_dict"]["head.weight"]
    wp = torch.load(tmp_path / "plain" / "model.pt", weights_only=False)["state_dict"]["head.weight"]
    wf = torch.load(tmp_path / "flood" / "model.pt", weights_only=False)["state_dict"]["head.weight"]
    # |L - b| + b with L < b is 2b - L: the same step, the other way
    assert not torch.allclose(wp, w0)
    assert torch.allclose(wf - w0, -(wp - w0), atol=1e-6)
    assert flooded.flood_level == 1e3 and plain.flood_level is None


def test_um_estimate_with_keep_one_is_the_mean_training_loss(tmp_path, gen):
    need_unleash()
    x, y = tiny_data(gen)
    init = _trained_model(tmp_path, x, y)
    cfg = make_config(
        "cpu-demo",
        **{
            **TINY,
            "groups": "sizes:2,2",
            "init": init,
            "um_estimate": 1.0,
            "um_estimate_only": True,
            "crop": 0,
            "flip": False,
            "out": str(tmp_path / "est"),
        },
    )
    r = train(cfg, data=(x, y))
    model, info = load_model(init)
    with torch.no_grad():
        want = float(mosx.group_cross_entropy(model.eval()(x), y, info["groups"]))
    assert r.flood_level == pytest.approx(want, rel=1e-4)
    assert (tmp_path / "est" / "flood_level.json").exists()
    # a real mask (keep < 1) drops weights: the loss goes up
    r2 = train(cfg.replace(um_estimate=0.5, out=str(tmp_path / "est2")), data=(x, y))
    assert r2.flood_level != pytest.approx(want, rel=1e-4)


def test_umap_masks_train_and_fold(tmp_path, gen):
    need_unleash()
    x, y = tiny_data(gen)
    init = _trained_model(tmp_path, x, y)
    cfg = make_config(
        "cpu-demo",
        **{
            **TINY,
            "steps": 4,
            "groups": "sizes:2,2",
            "init": init,
            "umap_keep": 0.75,
            "um_flood_level": 0.1,
            "ckpt_every": 0,
            "out": str(tmp_path / "umap"),
        },
    )
    train(cfg, data=(x, y))
    model, _ = load_model(str(tmp_path / "umap" / "model.pt"))  # plain layers: the masks were folded
    w = model.backbone.stages[1][0].weight
    assert 0.15 < float((w == 0).float().mean()) < 0.35


# ------------------------------------------------------------------------------ loading without running code
def test_trainer_files_load_without_running_code(tmp_path, gen):
    x, y = tiny_data(gen)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"x": x, "y": y, "extra": Payload(str(marker))}, evil)
    base = make_config("cpu-demo", **{**TINY, "steps": 2, "groups": "sizes:2,2"})
    with pytest.raises(ValueError, match="--trust-pickle"):  # .pt data
        train(base.replace(data=str(evil), out=str(tmp_path / "a")))
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match="--trust-pickle"):  # --init
        train(base.replace(data=str(tmp_path / "d.pt"), init=str(evil), out=str(tmp_path / "b")))
    assert not marker.exists()
    # the trainer's own checkpoint (RNG states included) loads with weights_only=True
    out = tmp_path / "c"
    train(base.replace(data=str(tmp_path / "d.pt"), out=str(out), ckpt_every=1))
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2
    (out / "checkpoint.pt").write_bytes(b"")  # zero bytes: a clear message, not EOFError
    with pytest.raises(ValueError, match="empty or truncated"):
        train(base.replace(data=str(tmp_path / "d.pt"), out=str(out), resume=True, steps=4))


def tiny_cli(data, out, *extra, steps=4, size=0):
    """`mosx train` arguments of a tiny flat run on `data` (a .pt file or an image folder) into out:
    small-cnn-4, batch 8, crop 6 (from `size`; 0 = the tensors as they are), no workers or bar."""
    return ["--data", str(data), "--out", str(out), "--model", "small-cnn-4", "--loss", "flat",
            "--steps", str(steps), "--batch-size", "8", "--resize", str(size), "--crop", "6",
            "--eval-resize", str(size), "--workers", "0", "--progress", "off", *extra]  # fmt: skip


# ------------------------------------------------------------------------------ divergence
@pytest.mark.parametrize("lr", [float("inf"), float("nan")])
def test_non_finite_lr_is_refused(lr, tmp_path):
    with pytest.raises(ValueError, match="lr must be a finite number"):
        make_config(**{**TINY, "lr": lr, "out": str(tmp_path)})


def test_divergence_stops_keeps_the_last_good_checkpoint_and_writes_no_model(gen, tmp_path):
    """lr 1e38 overflows the weights after the first step: the run raises at step 2, names it, and
    leaves the step-1 checkpoint (written while everything was finite) as it was."""
    from mosx.models.files import read_file
    from mosx.train import NonFiniteTraining

    out = str(tmp_path / "run")
    x, y = tiny_data(gen)
    cfg = make_config(
        **{**TINY, "loss": "flat", "lr": 1e38, "warmup_steps": 0, "milestones": (), "log_every": 1, "ckpt_every": 1},
        out=out,
    )
    with pytest.raises(NonFiniteTraining, match=r"training diverged.*model\.pt was not written") as e:
        train(cfg, data=(x, y), log=lambda m: None)
    assert not os.path.exists(os.path.join(out, "model.pt"))
    msg = str(e.value)
    assert "at step 2" in msg
    ck = read_file(os.path.join(out, "checkpoint.pt"))
    assert ck["step"] == 1 and "(step 1) is kept" in msg
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert all(np.isfinite(v) for _, v in ck["losses"])


def test_divergence_exits_non_zero_on_the_command_line(tmp_path, capsys):
    from mosx.train import main

    data = tmp_path / "d.pt"
    x, y = tiny_data(torch.Generator().manual_seed(1))
    torch.save({"x": x, "y": y}, data)
    argv = tiny_cli(data, tmp_path / "o", "--lr", "1e38", "--warmup-steps", "0", "--log-every", "1",
                    "--ckpt-every", "0", steps=12)  # fmt: skip
    assert main(argv) == 3
    assert "training diverged" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "model.pt")


# ------------------------------------------------------------------------------ resume of another run
def test_resume_refuses_another_run_unless_forced(gen, tmp_path):
    from mosx.train import ResumeMismatch

    x, y = tiny_data(gen)
    out = str(tmp_path / "run")
    base = make_config(**{**TINY, "loss": "group", "groups": "sizes:2,2", "steps": 8, "out": out})
    train(base, data=(x, y), log=lambda m: None)
    again = base.replace(resume=True)

    with pytest.raises(ResumeMismatch, match=r"lr: checkpoint 0\.003, now 0\.01.*--resume-force"):
        train(again.replace(lr=0.01), data=(x, y), log=lambda m: None)
    with pytest.raises(ResumeMismatch, match="grouping differs"):
        train(again.replace(groups="sizes:1,3"), data=(x, y), log=lambda m: None)
    y2 = y.clone()
    y2[:2] = y2[:2].flip(0)
    with pytest.raises(ResumeMismatch, match="training data differ"):
        train(again, data=(x, y2), log=lambda m: None)
    with pytest.raises(ResumeMismatch, match="at step 8, past --steps 4"):
        train(again.replace(steps=4), data=(x, y), log=lambda m: None)
    with pytest.raises(ResumeMismatch, match="past --steps 4"):  # forcing never makes a step-8 model a step-4 one
        train(again.replace(steps=4, resume_force=True), data=(x, y), log=lambda m: None)

    # more steps, and settings that do not change the computation, continue
    r = train(again.replace(steps=12, log_every=2, progress=False), data=(x, y), log=lambda m: None)
    assert r.resumed_from == 8 and r.steps == 12
    r = train(again.replace(steps=16, lr=0.01, resume_force=True), data=(x, y), log=lambda m: None)
    assert r.resumed_from == 12


def test_resume_mismatch_exits_2_on_the_command_line(tmp_path, capsys):
    from mosx.train import main

    data = tmp_path / "d.pt"
    x, y = tiny_data(torch.Generator().manual_seed(2))
    torch.save({"x": x, "y": y}, data)
    argv = tiny_cli(data, tmp_path / "o")
    assert main(argv) == 0
    assert main(argv + ["--resume", "--seed", "9"]) == 2
    assert "seed: checkpoint 0, now 9" in capsys.readouterr().err


def test_a_huge_class_id_is_refused_before_the_class_names_are_built():
    """A label of 10**12 in .pt data used to build a list of 10**12 class names."""
    from mosx.train.data import MAX_CLASSES, TensorData, _check_class_count

    y = torch.zeros(4, dtype=torch.long)
    y[2] = 10**12
    with pytest.raises(ValueError, match=r"class id 1000000000000 implies .* more than the 16777216"):
        TensorData(torch.zeros(4, 3), y)
    _check_class_count(MAX_CLASSES, None, "t")  # the largest allowed id passes
    with pytest.raises(ValueError, match="more than"):
        _check_class_count(MAX_CLASSES + 1, None, "t")


def test_an_image_folder_with_a_symlink_loop_is_refused(tmp_path):
    from PIL import Image

    from mosx.train.data import ImageData

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "x.png")
    assert len(ImageData.from_folder(str(tmp_path))) == 2
    os.symlink("..", tmp_path / "a" / "up")  # a/up -> the root: every level would list a/ and b/ again
    with pytest.raises(ValueError, match=r"a/up is a symlink loop"):
        ImageData.from_folder(str(tmp_path))


# ------------------------------------------------------------------------------ one job per folder
def _hold_lock(folder, pid):
    import socket

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".mosx.lock"), "w") as f:
        f.write(f"{pid}\n{socket.gethostname()}\n")


def test_a_second_run_on_the_same_out_stops_before_writing(gen, tmp_path, capsys):
    from mosx._io import OutputBusy
    from mosx.train import main

    x, y = tiny_data(gen)
    out = str(tmp_path / "run")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _hold_lock(out, other.pid)
        cfg = make_config(**{**TINY, "loss": "flat", "steps": 2, "out": out})
        with pytest.raises(OutputBusy, match=rf"another training run \(pid {other.pid} "):
            train(cfg, data=(x, y), log=lambda m: None)
        assert sorted(os.listdir(out)) == [".mosx.lock"]  # nothing written
        data = tmp_path / "d.pt"
        torch.save({"x": x, "y": y}, data)
        argv = tiny_cli(data, out, steps=2)
        assert main(argv) == 2
        assert "is writing here" in capsys.readouterr().err
    finally:
        other.kill()
        other.wait()
    # the holder is gone: its lock is stale, taken over, and released at the end
    r = train(cfg, data=(x, y), log=lambda m: None)
    assert r.steps == 2 and not os.path.exists(os.path.join(out, ".mosx.lock"))


def test_an_unreadable_training_image_stops_the_run_naming_it(tmp_path, capsys):
    from PIL import Image

    from mosx.train import main
    from mosx.train.data import UnreadableImage

    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for k in range(4):
            Image.new("RGB", (8, 8), (40 * k, 0, 0)).save(tmp_path / "d" / c / f"{k}.png")
    bad = tmp_path / "d" / "b" / "2.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a PNG signature and nothing decodable
    cfg = make_config(**{**TINY, "loss": "flat", "steps": 4, "batch_size": 8, "resize": 8, "crop": 6,
                         "eval_resize": 8, "data": str(tmp_path / "d"), "out": str(tmp_path / "o")})  # fmt: skip
    with pytest.raises(UnreadableImage, match=r"b/2\.png \(sample 6, class 1\) cannot be read"):
        train(cfg, log=lambda m: None)
    argv = tiny_cli(tmp_path / "d", tmp_path / "o2", size=8)
    assert main(argv) == 4
    assert "2.png" in capsys.readouterr().err
