"""amoc.runtime: what `auto` picks on each kind of machine (the CPU's bf16 capability
faked both ways), that explicit settings win, and the one line each stage prints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO

from amoc import cli, runtime
from amoc.config import RuntimeConfig
from amoc.distributed import Dist
from amoc.errors import ConfigError
from amoc.runtime import FAKE_CPU_BF16, choose, cpu_bf16_support, setup

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(autouse=True)
def keep_threads():
    """setup() sets torch's thread count for the process: give the next test its own."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cpu_has(monkeypatch):
    """cpu_has(answer): fake runtime.cpu_bf16_support ("AMX", "AVX512-BF16" or None)."""
    monkeypatch.delenv(FAKE_CPU_BF16, raising=False)

    def fake(answer):
        monkeypatch.setattr(runtime, "cpu_bf16_support", lambda: answer)

    return fake


def rc(**kw) -> RuntimeConfig:
    return RuntimeConfig(device="cpu", progress=False, **kw)


@pytest.mark.parametrize("unit", ["AMX", "AVX512-BF16"])
def test_auto_on_a_cpu_with_native_bf16_is_bf16_and_channels_last(cpu_has, unit):
    cpu_has(unit)
    amp, why, cl, why_cl = choose(rc(), CPU)
    assert amp is torch.bfloat16 and cl
    assert why == f"auto: CPU has {unit}" and unit in why_cl


def test_auto_on_a_cpu_without_is_fp32_contiguous(cpu_has):
    cpu_has(None)
    assert choose(rc(), CPU) == (None, "auto: CPU has no AMX or AVX512-BF16", False, "auto: fp32 on cpu")


@pytest.mark.parametrize("unit", ["AMX", None])
def test_explicit_settings_win(cpu_has, unit):
    cpu_has(unit)
    amp, why, cl, why_cl = choose(rc(precision="fp32"), CPU)
    assert (amp, why, cl) == (None, "runtime.precision=fp32", False)  # fp32 on a CPU: contiguous
    amp, why, cl, _ = choose(rc(precision="bf16"), CPU)
    assert (amp, why, cl) == (torch.bfloat16, "runtime.precision=bf16", unit is not None)
    for precision in ("auto", "fp32", "bf16"):
        for layout in ("on", "off"):
            _, _, cl, why_cl = choose(rc(precision=precision, channels_last=layout), CPU)
            assert cl == (layout == "on") and why_cl == f"runtime.channels_last={layout}"


@pytest.fixture
def card(monkeypatch):
    """card(native): fake torch.cuda.is_bf16_supported for a card with (Ampere and later)
    or without (T4, V100, P100) native bf16; it answers True to a question that admits
    emulation, as torch does."""
    asked = []

    def fake(native: bool) -> list:
        def is_bf16_supported(including_emulation: bool = True) -> bool:
            asked.append(including_emulation)
            return native or including_emulation

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        return asked

    return fake


@pytest.mark.parametrize("unit", ["AMX", None])
def test_cuda_with_native_bf16_is_bf16_and_channels_last_whatever_the_cpu(cpu_has, card, unit):
    cpu_has(unit)
    card(True)
    assert choose(rc(), CUDA) == (torch.bfloat16, "auto: CUDA with native bf16", True, "auto: bf16 on CUDA")
    assert choose(rc(precision="fp32"), CUDA)[:3] == (None, "runtime.precision=fp32", False)
    assert choose(rc(channels_last="off"), CUDA)[:3] == (torch.bfloat16, "auto: CUDA with native bf16", False)


def test_a_card_without_native_bf16_runs_fp32_and_says_why(cpu_has, card):
    """bf16 on a pre-Ampere card is emulated, slower than fp32: auto must not pick it."""
    cpu_has(None)
    asked = card(False)
    amp, why, cl, why_cl = choose(rc(), CUDA)
    assert amp is None and not cl
    assert why == "auto: this CUDA device has no native bf16 (pre-Ampere), so fp32" and why_cl == "auto: fp32 on CUDA"
    assert asked == [False]  # emulation does not count
    assert choose(rc(precision="bf16"), CUDA)[:2] == (torch.bfloat16, "runtime.precision=bf16")  # asked for


@pytest.mark.parametrize("device", [CPU, CUDA])
@pytest.mark.parametrize("precision", ["auto", "bf16", "fp32"])
def test_evaluation_is_always_fp32(cpu_has, device, precision):
    cpu_has("AMX")
    amp, why, cl, _ = choose(rc(precision=precision), device, evaluation=True)
    assert amp is None and why == "evaluation always runs fp32"
    assert not cl  # follows fp32: contiguous


def test_no_cuda_device_auto_means_the_cpu(cpu_has, monkeypatch):
    cpu_has(None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rt = setup(RuntimeConfig(device="auto", progress=False), 0)
    assert rt.device == CPU and rt.amp_dtype is None and not rt.channels_last
    cpu_has("AMX")
    rt = setup(RuntimeConfig(device="auto", progress=False), 0)
    assert rt.device == CPU and rt.amp_dtype is torch.bfloat16 and rt.channels_last


def test_capability_queries_missing_or_failing_mean_no(monkeypatch):
    monkeypatch.delenv(FAKE_CPU_BF16, raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert cpu_bf16_support() is None  # an older torch without the queries
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: 1 / 0, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert cpu_bf16_support() == "AVX512-BF16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert cpu_bf16_support() == "AMX"


def test_the_fake_environment_variable(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setenv(FAKE_CPU_BF16, "0")
    assert cpu_bf16_support() is None
    monkeypatch.setenv(FAKE_CPU_BF16, "1")
    assert "AMX" in cpu_bf16_support()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert "faked" in cpu_bf16_support()


def test_the_announcement_is_one_line_on_the_main_rank_only(cpu_has, capsys):
    cpu_has("AMX")
    setup(rc(threads=1), 0, stage="pretrain")
    assert capsys.readouterr().out == (
        "amoc pretrain runtime: cpu, bf16 autocast (auto: CPU has AMX), "
        "channels_last on (auto: bf16 on a CPU with AMX), 1 CPU thread\n"
    )
    setup(rc(threads=1), 0, stage="evaluate", evaluation=True)
    assert capsys.readouterr().out == (
        "amoc evaluate runtime: cpu, fp32 (evaluation always runs fp32), "
        "channels_last off (auto: fp32 on cpu), 1 CPU thread\n"
    )
    setup(rc(threads=1), 0)  # no stage: silent (benchmarks, tests)
    setup(rc(threads=1), 0, Dist(rank=1, world=2), stage="probe")  # not the main rank
    assert capsys.readouterr().out == ""


def test_stages_announce_their_runtime(params, tmp_path, capsys, monkeypatch):
    """End to end with the CPU faked to have AMX and `precision: auto` (the tiny preset pins
    fp32): pretrain and finetune train in bf16 autocast with channels_last (which run on
    any CPU, slowly) and say so, once each; evaluate says fp32."""
    monkeypatch.setenv(FAKE_CPU_BF16, "1")
    data, enc, clf, ev = (tmp_path / name for name in ("data", "pretrain", "finetune", "eval"))
    common = ["--params", str(params)] + [
        a
        for s in (
            "runtime.precision=auto",
            "runtime.device=cpu",
            "pretrain.epochs=1",
            "data.train_limit=256",
            "data.test_limit=64",
            "finetune.epochs=1",
            "variant=ACA",
            "evaluate.autoattack=false",
        )
        for a in ("--set", s)
    ]
    assert cli.main(["download", *common, "--out", str(data)]) == 0
    capsys.readouterr()
    assert cli.main(["pretrain", *common, "--data", str(data), "--out", str(enc)]) == 0
    assert (
        cli.main(["finetune", *common, "--init", str(enc / "encoder.pt"), "--data", str(data), "--out", str(clf)]) == 0
    )
    assert (
        cli.main(["evaluate", *common, "--model", str(clf / "classifier.pt"), "--data", str(data), "--out", str(ev)])
        == 0
    )
    lines = [ln for ln in capsys.readouterr().out.splitlines() if " runtime: " in ln]
    amx = "AMX, faked by AMOC_FAKE_CPU_BF16"
    train = f"cpu, bf16 autocast (auto: CPU has {amx}), channels_last on (auto: bf16 on a CPU with {amx}), 1 CPU thread"
    assert lines == [
        f"amoc pretrain runtime: {train}",
        f"amoc finetune runtime: {train}",
        "amoc evaluate runtime: cpu, fp32 (evaluation always runs fp32), channels_last off (auto: fp32 on cpu), "
        "1 CPU thread",
    ]
    assert json.loads((enc / "summary.json").read_text())["epochs"] == 1
    assert json.loads((ev / "eval.json").read_text())["settings"]["precision"] == "fp32, TF32 off"


FP32_BACKENDS = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)


@pytest.fixture
def fp32_flags():
    """Leave the process's fp32 precision switches as they were."""
    before = [b.fp32_precision for b in FP32_BACKENDS]
    yield
    for backend, value in zip(FP32_BACKENDS, before):
        backend.fp32_precision = value


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_cuda_never_uses_tf32_in_training_or_evaluation(monkeypatch, card, fp32_flags, precision):
    """precision fp32 is IEEE fp32 (cuDNN's convolutions default to TF32), and the InfoNCE
    logits and k-NN similarities, fp32 outside autocast on purpose, stay IEEE under bf16."""
    monkeypatch.setattr(runtime, "resolve_device", lambda name: CUDA)
    card(True)
    cfg = RuntimeConfig(device="cuda", progress=False, precision=precision)
    for evaluation in (False, True):
        for backend in FP32_BACKENDS:
            backend.fp32_precision = "tf32"
        rt = setup(cfg, 0, evaluation=evaluation)
        assert [b.fp32_precision for b in FP32_BACKENDS] == ["ieee"] * 3
    assert rt.amp_dtype is None and rt.attack_amp_dtype is None


def test_an_explicit_gpu_index_under_torchrun_is_refused():
    """cuda:N would put every rank on card N while DDP uses the local rank's."""
    with pytest.raises(ConfigError, match=r"runtime.device: 'cuda:1' would put all 2 torchrun processes on one GPU"):
        setup(RuntimeConfig(device="cuda:1", progress=False), 0, Dist(rank=0, world=2, local_rank=0))


@pytest.mark.parametrize(
    "precision,attack,expected",
    [
        ("fp32", "same", None),
        ("bf16", "same", torch.bfloat16),
        ("bf16", "fp32", None),
        ("fp32", "bf16", torch.bfloat16),
    ],
)
def test_attack_precision(precision, attack, expected):
    rt = setup(rc(precision=precision, attack_precision=attack), 0)
    assert rt.attack_amp_dtype == expected
    with rt.attack_autocast():
        assert torch.is_autocast_enabled("cpu") == (expected is not None)
    assert ("attacks" in rt.describe()) == (rt.attack_amp_dtype != rt.amp_dtype)


def test_training_attacks_run_in_the_attack_precision_and_the_update_in_the_training_one():
    """A PGD-AT step with fp32 training and bf16 attacks: every forward inside the attack
    runs under bf16 autocast, the trained forward without."""
    from amoc.config import AttackConfig
    from amoc.downstream.trainer import TrainSpec, loss_step
    from amoc.nets import build_encoder
    from amoc.nets.classifier import Classifier

    model = Classifier(build_encoder(width=0.0625), 4)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    spec = TrainSpec(
        loss="pgd_at",
        epochs=1,
        batch_size=4,
        lr=0.1,
        momentum=0.9,
        weight_decay=0.0,
        milestones=(),
        lr_gamma=0.1,
        beta=6.0,
        trades_start="uniform",
        attack=AttackConfig(steps=2),
        val_images=0,
    )
    rt = setup(rc(precision="fp32", attack_precision="bf16"), 0)
    loss_step(model, spec, torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), rt, torch.Generator())
    assert seen == [True, True, False]  # 2 PGD steps, then the training forward


def test_the_tiny_preset_pins_fp32(params, cpu_has):
    """The tests' exact comparisons rely on it: on an AMX machine `auto` would be bf16."""
    from amoc import config

    cpu_has("AMX")
    cfg = config.load(params).runtime
    assert cfg.precision == "fp32" and choose(cfg, CPU)[:3] == (None, "runtime.precision=fp32", False)
    assert config.load(REPO / "params.yaml").runtime.precision == "auto"  # not pinned for users
