"""Each loss against its formula on hand-made tensors, DisMax's invariances and mosaic, numerical
safety at extreme values, and that a few training steps reduce every loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from oodbench.config import BenchmarkConfig, RunConfig, load_benchmark
from oodbench.errors import OodbenchError
from oodbench.experiment import build_model, check_benchmark
from oodbench.losses import LOSSES
from oodbench.losses.dismax import DisMaxHead, DisMaxLoss, mosaic
from oodbench.losses.isomax import EntropicCrossEntropy, IsoMaxHead, IsoMaxPlusHead
from oodbench.losses.logsoftmax_resnet import LogSoftmaxResNetLoss
from oodbench.losses.softmax import SoftMaxLoss
from oodbench.models import ModelOutput, build_classifier
from oodbench.models.activations import ACTIVATION_ENTROPY, ChannelLogSoftmax

ALL_LOSSES = LOSSES.names()


def test_registry_holds_every_loss() -> None:
    assert set(ALL_LOSSES) == {"softmax", "isomax", "isomaxplus", "dismax", "logsoftmax-resnet",
                               "logitnorm", "t2fnorm", "oe", "energy-ft"}


def test_softmax_is_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    y = torch.tensor([0, 1])
    by_hand = [-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1))),
               -math.log(math.exp(0.5) / (2 * math.exp(0.5) + math.exp(3)))]
    assert SoftMaxLoss()(logits, y).item() == pytest.approx(sum(by_hand) / 2, rel=1e-6)


def test_isomax_head_and_entropic_scale() -> None:
    head = IsoMaxHead(2, 2)
    assert torch.equal(head.prototypes, torch.zeros(2, 2))  # the paper's initialisation
    with torch.no_grad():
        head.prototypes.copy_(torch.tensor([[0.0, 0.0], [3.0, 0.0]]))
    logits = head(torch.tensor([[3.0, 4.0]]))
    assert logits[0].tolist() == pytest.approx([-5.0, -4.0])
    loss = EntropicCrossEntropy()(logits, torch.tensor([0]))
    assert loss.item() == pytest.approx(-math.log(math.exp(-50) / (math.exp(-50) + math.exp(-40))),
                                        rel=1e-5)


def test_isomaxplus_head_normalises_and_scales() -> None:
    head = IsoMaxPlusHead(2, 2)
    with torch.no_grad():
        head.prototypes.copy_(torch.tensor([[0.0, 5.0], [2.0, 0.0]]))
        head.distance_scale.fill_(-2.0)  # the scale enters as |s|
    logits = head(torch.tensor([[7.0, 0.0]]))
    assert logits[0].tolist() == pytest.approx([-2.0 * math.sqrt(2.0), 0.0], abs=1e-6)


def _dismax_head() -> DisMaxHead:
    head = DisMaxHead(2, 3)
    with torch.no_grad():
        head.prototypes.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]))
    return head


def test_dismax_head_formula() -> None:
    d = torch.tensor([1.0, 0.0, math.sqrt(2.0)])  # ||f̂ − p̂|| / √2 for f = (4, 0)
    expected = -(d + d.mean())
    assert _dismax_head()(torch.tensor([[4.0, 0.0]]))[0].tolist() == pytest.approx(
        expected.tolist(), abs=1e-6)


def test_dismax_logits_do_not_change_when_a_feature_vector_is_scaled() -> None:
    torch.manual_seed(0)
    head = DisMaxHead(16, 5)
    f = torch.randn(4, 16)
    scales = torch.tensor([[0.01], [1.0], [7.3], [1e4]])
    torch.testing.assert_close(head(f * scales), head(f), rtol=0, atol=1e-5)


def test_dismax_mean_distance_term_leaves_training_loss_unchanged() -> None:
    torch.manual_seed(1)
    head = DisMaxHead(8, 4)
    f = torch.randn(6, 8)
    with_mean = head(f)
    without_mean = -head.distances(f)
    assert not torch.allclose(with_mean, without_mean)
    hard = torch.tensor([0, 1, 2, 3, 0, 1])
    quads = torch.tensor([[0] * 4, [1] * 4, [2] * 4, [0, 1, 2, 3], [1, 1, 2, 0], [3, 2, 1, 0]])
    for targets in (hard, quads):
        crit = DisMaxLoss()
        torch.testing.assert_close(crit(with_mean, targets), crit(without_mean, targets))


def test_mosaic_puts_quadrants_and_targets_together() -> None:
    b, half = 10, 5
    images = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 6, 6).clone()
    targets = torch.arange(b) % 7
    x, quads = mosaic(images, targets)
    assert torch.equal(x[:half], images[:half])
    assert torch.equal(quads[:half], targets[:half, None].repeat(1, 4))
    corners = {0: (slice(0, 3), slice(0, 3)), 1: (slice(3, 6), slice(0, 3)),
               2: (slice(0, 3), slice(3, 6)), 3: (slice(3, 6), slice(3, 6))}
    for i in range(half):
        sources = set()
        for q, (rows, cols) in corners.items():
            patch = x[half + i, :, rows, cols]
            src = int(patch.flatten()[0])
            assert torch.all(patch == src)  # a whole quadrant from one source image
            assert half <= src < b  # ... taken from the mosaic half
            assert int(quads[half + i, q]) == int(targets[src])  # ... with that image's class
            sources.add(src)
        assert len(sources) == 4  # four different samples
    assert torch.equal(images[:, 0, 0, 0], torch.arange(b, dtype=torch.float32))  # input intact


def test_dismax_fpr_loss_formula() -> None:
    logits = torch.tensor([[-1.0, -2.0, -3.0], [-2.0, -1.0, -3.0], [-1.5, -1.0, -2.0],
                           [-1.0, -1.2, -1.1]])
    targets = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 2, 2], [1, 1, 1, 0]])
    log_p = F.log_softmax(10 * logits, dim=1)
    ce = -(log_p[0, 0] + log_p[1, 1]) / 2
    t = torch.tensor([[0.25, 0.25, 0.5], [0.25, 0.75, 0.0]])
    kl = sum(float(t[r, c] * (math.log(t[r, c]) - log_p[2 + r, c]))
             for r in range(2) for c in range(3) if t[r, c] > 0) / 2
    for alpha in (1.0, 0.5):
        got = DisMaxLoss(alpha=alpha)(logits, targets).item()
        assert got == pytest.approx((float(ce) + alpha * kl) / 2, rel=1e-5)


def test_dismax_preprocess_mosaics_only_in_training_and_with_fpr() -> None:
    x, y = torch.rand(8, 1, 4, 4), torch.arange(8)
    crit = DisMaxLoss()
    assert crit.preprocess(x, y)[1].shape == (8, 4)
    crit.eval()
    assert crit.preprocess(x, y)[1] is y
    assert DisMaxLoss(fpr=False).preprocess(x, y)[1] is y


def test_channel_log_softmax_entropy() -> None:
    act = ChannelLogSoftmax()
    act.recorded = []
    x = torch.zeros(2, 5, 3, 4)
    x[1, 0] = 1e4  # one certain channel: zero entropy
    z = act(x)
    torch.testing.assert_close(z.exp().sum(1), torch.ones(2, 3, 4))
    assert act.recorded[0].tolist() == pytest.approx([12 * math.log(5), 0.0], abs=1e-4)


def test_logsoftmax_resnet_loss_adds_weighted_entropy() -> None:
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 1])
    out = ModelOutput(logits, torch.zeros(2, 1), aux={ACTIVATION_ENTROPY: torch.tensor([3., 5.])})
    ce = F.cross_entropy(logits, y)
    assert LogSoftmaxResNetLoss(0.0).training_loss(out, y).item() == pytest.approx(ce.item())
    assert LogSoftmaxResNetLoss(0.0).aux == ()
    crit = LogSoftmaxResNetLoss(1e-2)
    assert crit.aux == (ACTIVATION_ENTROPY,)
    assert crit.training_loss(out, y).item() == pytest.approx(ce.item() + 1e-2 * 4.0)
    with pytest.raises(OodbenchError):
        LogSoftmaxResNetLoss(-1.0)


def test_entropy_term_from_a_real_forward_pass() -> None:
    torch.manual_seed(0)
    model = build_classifier("smallcnn8", torch.nn.Linear, 3, 1, 8, "logsoftmax")
    x = torch.randn(2, 1, 8, 8)
    by_hook: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, ChannelLogSoftmax):
            m.register_forward_hook(lambda _m, _i, z: by_hook.append(
                -(z.exp() * z).sum(dim=(1, 2, 3))))
    out = model.forward_all(x, aux=(ACTIVATION_ENTROPY,))
    assert len(by_hook) == 3
    torch.testing.assert_close(out.aux[ACTIVATION_ENTROPY], sum(by_hook))
    with pytest.raises(OodbenchError, match="no log-softmax"):
        build_classifier("smallcnn8", torch.nn.Linear, 3, 1, 8).forward_all(
            x, aux=(ACTIVATION_ENTROPY,))


def _head_and_criterion(name: str, d: int = 6, k: int = 4):
    spec = LOSSES.get(name)
    return spec.head(d, k), spec.criterion()


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_extreme_values_give_finite_losses_and_gradients(name: str) -> None:
    torch.manual_seed(0)
    head, crit = _head_and_criterion(name)
    features = (torch.randn(8, 6) * 1e4).requires_grad_()
    logits = head(features)
    targets = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    loss = crit(logits, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(features.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    for raw in (torch.tensor([[1e4, -1e4, 0.0, 1e4]] * 4), torch.full((4, 4), -1e4)):
        raw = raw.clone().requires_grad_()
        quads = torch.tensor([[0] * 4, [1] * 4, [0, 1, 2, 3], [3, 3, 2, 1]])
        for t in (targets[:4], quads) if name == "dismax" else (targets[:4],):
            loss = crit(raw, t)
            (g,) = torch.autograd.grad(loss, raw)
            assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_log_softmax_activation_is_finite_at_extremes() -> None:
    x = torch.tensor([1e4, -1e4, 0.0, 3e4]).view(1, 4, 1, 1).repeat(2, 1, 2, 2)
    x.requires_grad_()
    act = ChannelLogSoftmax()
    act.recorded = []
    z = act(x)
    (act.recorded[0].sum() + z.sum()).backward()
    assert torch.isfinite(z).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(act.recorded[0]).all()


@pytest.fixture(scope="module")
def digit_batch() -> tuple[torch.Tensor, torch.Tensor]:
    from oodbench.data import DataContext, InputTransform
    from oodbench.experiment import in_distribution_info, load_in_distribution

    cfg = RunConfig(load_benchmark("digits"), "softmax", 0)
    train = load_in_distribution(cfg, "train", DataContext.resolve())
    x = InputTransform.for_model(in_distribution_info(cfg))(train.images[:32])
    return x, train.labels[:32]


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_a_few_training_steps_reduce_the_loss(name: str, digit_batch) -> None:
    x, y = digit_batch
    torch.manual_seed(0)
    cfg = RunConfig(load_benchmark("digits"), name, 0,
                    {"entropy_weight": 1e-3} if name == "logsoftmax-resnet" else {})
    model = build_model(cfg)
    crit = LOSSES.get(name).criterion(**cfg.loss_options)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    torch.manual_seed(1)
    xb, tb = crit.preprocess(x, y)  # one fixed (mosaicked, for DisMax) batch

    def loss_now() -> torch.Tensor:
        return crit.training_loss(model.forward_all(xb, aux=crit.aux), tb)

    first = None
    for _ in range(10):
        loss = loss_now()
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        if crit.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), crit.max_grad_norm)
        opt.step()
    assert float(loss_now().detach()) < 0.9 * first


def test_loss_needing_a_model_variant_is_checked_up_front() -> None:
    raw = load_benchmark("digits").to_dict()
    raw.update(model="densenet100", losses=["softmax", "logsoftmax-resnet"])
    bench = BenchmarkConfig.from_dict(raw)  # structurally fine; the names are checked next
    with pytest.raises(OodbenchError, match="logsoftmax-resnet") as e:
        check_benchmark(bench)
    assert "resnet20" in (e.value.hint or "")
    bench = load_benchmark("digits")
    bench.model = "wrn28-10"
    with pytest.raises(OodbenchError, match="log"):
        build_model(RunConfig(bench, "logsoftmax-resnet", 0))


@pytest.mark.parametrize("name,options,message", [
    ("dismax", {"alpha": "abc"}, "loss 'dismax': option 'alpha' must be a number >= 0, got 'abc'"),
    ("dismax", {"alpha": -0.5}, "option 'alpha' must be a number >= 0, got -0.5"),
    ("dismax", {"alpha": True}, "option 'alpha' must be a number >= 0, got True"),
    ("dismax", {"alpha": float("inf")}, "option 'alpha' must be a number >= 0, got inf"),
    ("dismax", {"fpr": "no"}, "option 'fpr' must be true or false, got 'no'"),
    ("dismax", {"fpr": 0}, "option 'fpr' must be true or false, got 0"),
    ("dismax", {"entropic_scale": 0}, "option 'entropic_scale' must be a number > 0, got 0"),
    ("isomax", {"entropic_scale": -10}, "loss 'isomax' / 'isomaxplus': option "
     "'entropic_scale' must be a number > 0, got -10"),
    ("logsoftmax-resnet", {"entropy_weight": -1}, "option 'entropy_weight' must be a number "
     ">= 0, got -1"),
    ("logsoftmax-resnet", {"max_grad_norm": "big"}, "option 'max_grad_norm' must be a number "
     ">= 0 or null, got 'big'"),
    ("dismax", {"nosuch": 1}, "loss 'dismax' has no option 'nosuch'"),
    ("softmax", {"alpha": 1}, "loss 'softmax' has no option 'alpha'"),
])
def test_loss_options_are_typed_and_ranged(name, options, message):
    spec = LOSSES.get(name)
    with pytest.raises(OodbenchError) as e:
        spec.criterion(**options)
    assert e.value.message.endswith(message) and e.value.message.startswith("loss ")
    assert "options of this loss: " + spec.describe_options() in e.value.hint
    with pytest.raises(OodbenchError):
        spec.check_options(options)  # the same check without building the criterion


def test_valid_options_are_listed_and_converted():
    assert LOSSES.get("dismax").describe_options() == (
        "alpha (a number >= 0, default 1.0), entropic_scale (a number > 0, default 10.0), "
        "fpr (true or false, default true)")
    assert LOSSES.get("softmax").describe_options() == "none"
    crit = LOSSES.get("dismax").criterion(alpha="1e-3", fpr=False, entropic_scale=5)
    assert (crit.alpha, crit.fpr, crit.entropic_scale) == (0.001, False, 5.0)
    assert isinstance(crit.entropic_scale, float)
    assert LOSSES.get("dismax").check_options({"alpha": 2}) == {"alpha": 2.0}
    ls = LOSSES.get("logsoftmax-resnet").criterion
    assert ls(max_grad_norm=None).max_grad_norm is None
    assert ls(max_grad_norm=0).max_grad_norm is None  # 0 = no clipping
    assert ls(entropy_weight=0).entropy_weight == 0.0
    with pytest.raises(OodbenchError, match="takes 2 option"):
        LogSoftmaxResNetLoss(0.1, 1.0, 3.0)
    with pytest.raises(OodbenchError, match="given twice"):
        LogSoftmaxResNetLoss(0.1, entropy_weight=0.2)


def test_make_criterion_refuses_bad_options_of_a_run():
    from oodbench.train import make_criterion

    with pytest.raises(OodbenchError, match="option 'alpha'"):
        make_criterion(RunConfig(load_benchmark("digits"), "dismax", 0, {"alpha": "abc"}))
