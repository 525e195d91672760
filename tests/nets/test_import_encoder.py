"""`amoc import-encoder`: released checkpoints of the AMOC authors, ACL and DynACL.

Each source state dict is built in tests/import_helpers.py from the official code's
module structure (key names and shapes written out by hand, not taken from amoc's
mapping), with random values; a reference forward, also written there, runs the source
layout on its own terms (its BN names, its shortcut names, its normalisation). The
imported encoder must give the same features on both BN branches."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from import_helpers import CIFAR10, IMAGENET, acl_projector, authors_moco, reference_features, resnet18_state

from amoc import cli
from amoc.nets import set_bn_branch
from amoc.nets.import_encoder import LAYOUTS
from amoc.nets.store import load_encoder_file

REPO = Path(__file__).resolve().parents[2]


def images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def import_cli(*args: str) -> int:
    return cli.main(["import-encoder", "--params", str(REPO / "params.yaml"), *args])


def check_features(out: Path, source: dict, layout: str, width: float) -> None:
    encoder, _ = load_encoder_file(out)
    encoder.eval()
    x = images(size=32 if width == 1.0 else 16)
    for branch in ("clean", "adv"):
        set_bn_branch(encoder, branch)
        with torch.no_grad():
            ours, ref = encoder(x), reference_features(source, layout, branch, x)
        assert ours.shape == ref.shape == (len(x), max(1, round(512 * width)))
        assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-5), (branch, (ours - ref).abs().max())
    clean, adv = (reference_features(source, layout, b, x) for b in ("clean", "adv"))
    assert not torch.allclose(clean, adv, atol=1e-3), "the two branches must differ for the check to mean anything"


# --------------------------------------------------------------------------- the three layouts
@pytest.mark.parametrize("legacy", [True, False], ids=["torch<1.6-file", "zip-file"])
def test_authors_paras_pt_imports_with_the_same_features(tmp_path, capsys, legacy):
    """The authors' paras.pt (encoder_q.state_dict(), full width) as torch 1.4 saved it
    (their requirement: the legacy, non-zip serialisation) and as a current torch would."""
    source = resnet18_state("authors")
    src = tmp_path / "paras.pt"
    torch.save(source, src, _use_new_zipfile_serialization=not legacy)
    out = tmp_path / "encoder.pt"
    assert import_cli("--from", "authors", str(src), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "bn_clean -> clean, bn_adv -> adv" in printed and "adv branch" in printed
    assert "pretrain.from_encoder.sha256=" in printed
    check_features(out, source, "authors", 1.0)
    _, extra = load_encoder_file(out)
    s = extra["source"]
    assert extra["bn_branch"] == "adv" and extra["method"] == "amoc"
    assert s["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (s["layout"], s["code"], s["commit"]) == ("authors", "MTandHJ/amoc", LAYOUTS["authors"].commit)
    assert s["bn_mapping"] == {"bn_clean": "clean", "bn_adv": "adv"} and s["width"] == 1.0
    assert s["normalization"]["mean"] == pytest.approx(CIFAR10[0]) and s["dropped"] == {}


def test_authors_whole_moco_keeps_the_query_encoder(tmp_path, capsys):
    """Their training checkpoint holds the whole MoCo under 'model': encoder_q is imported,
    encoder_k, the projectors and the queues are dropped (and counted)."""
    moco = authors_moco(width=0.0625)
    src = tmp_path / "model-optim-lr_sch-epoch.tar"
    torch.save({"model": moco, "epoch": 200}, src)
    out = tmp_path / "encoder.pt"
    assert import_cli("--from", "authors", str(src), "--out", str(out), "--bn-branch", "clean") == 0
    assert "downstream stages use the clean branch" in capsys.readouterr().out
    query = {k[len("encoder_q.") :]: v for k, v in moco.items() if k.startswith("encoder_q.")}
    check_features(out, query, "authors", 0.0625)
    _, extra = load_encoder_file(out)
    assert extra["bn_branch"] == "clean"
    n_enc = len(query)
    assert extra["source"]["dropped"] == {
        "encoder_k": n_enc,
        "projector_q": 4,
        "projector_k": 4,
        "queue_clean": 1,
        "queue_clean_ptr": 1,
        "queue_adv": 1,
        "queue_adv_ptr": 1,
    }


def test_acl_checkpoint_imports_with_the_same_features(tmp_path, capsys):
    """ACL's train_simCLR.py checkpoint: {'epoch', 'state_dict', 'optim'}, the ResNet with
    ImageNet normalize buffers, bn_list.0 (normal) / bn_list.1 (pgd), proj_head as fc."""
    state = resnet18_state("acl")
    acl_projector(state)
    src = tmp_path / "ACL_DS.pt"
    optim = {"state": {0: {"momentum_buffer": torch.zeros(3)}}, "param_groups": [{"lr": 5.0, "params": [0]}]}
    torch.save({"epoch": 1000, "state_dict": state, "optim": optim}, src)
    out = tmp_path / "encoder.pt"
    assert import_cli("--from", "acl", str(src), "--out", str(out)) == 0
    assert "bn_list.0 -> clean, bn_list.1 -> adv" in capsys.readouterr().out
    check_features(out, state, "acl", 1.0)
    _, extra = load_encoder_file(out)
    assert extra["method"] == "acl" and extra["source"]["dropped"] == {"fc": 34}  # 3 weights, 1 bias, 3 dual BNs of 5
    assert extra["source"]["normalization"]["mean"] == pytest.approx(IMAGENET[0])


@pytest.mark.parametrize("container", ["model.pt", "model_encoder_k.pt"])
def test_dynacl_imports_its_ema_key_encoder(tmp_path, container):
    """DynACL's model.pt (resnet18_momentum: encoder_q. and encoder_k., each ACL's ResNet
    with its projector) gives the EMA key encoder; model_encoder_k.pt holds that alone."""
    width = 0.0625
    key = resnet18_state("dynacl", width, seed=3)
    acl_projector(key, width)
    query = resnet18_state("dynacl", width, seed=4)
    acl_projector(query, width)
    if container == "model.pt":
        state = {**{f"encoder_q.{k}": v for k, v in query.items()}, **{f"encoder_k.{k}": v for k, v in key.items()}}
    else:
        state = key
    src = tmp_path / container
    torch.save({"epoch": 1000, "state_dict": state}, src)
    out = tmp_path / "encoder.pt"
    assert import_cli("--from", "dynacl", str(src), "--out", str(out)) == 0
    check_features(out, key, "dynacl", width)
    _, extra = load_encoder_file(out)
    assert extra["method"] == "dynacl"
    dropped = extra["source"]["dropped"]
    assert dropped == ({"encoder_q": len(query), "encoder_k.fc": 34} if container == "model.pt" else {"fc": 34})


# --------------------------------------------------------------------------- wrong files
def _fails(tmp_path, capsys, *args: str) -> str:
    out = tmp_path / "encoder.pt"
    assert import_cli(*args, "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line
    assert not out.exists() and not list(tmp_path.glob(".encoder.pt.*"))  # nothing written
    return err


def test_the_wrong_layout_is_one_error_naming_the_keys(tmp_path, capsys):
    state = resnet18_state("acl", 0.0625)
    acl_projector(state, 0.0625)
    src = tmp_path / "acl.pt"
    torch.save({"state_dict": state}, src)
    err = _fails(tmp_path, capsys, "--from", "authors", str(src))
    assert "does not match the authors layout" in err
    assert "missing (bn1.bn_clean.weight" in err and "unexpected (" in err and "bn_list" in err
    assert "it looks like --from acl" in err


def test_a_missing_or_misshapen_tensor_is_named(tmp_path, capsys):
    state = resnet18_state("authors", 0.0625)
    del state["layer3.0.downsample.1.bn_adv.running_var"]
    state["layer2.1.conv2.weight"] = state["layer2.1.conv2.weight"][:, :, :2]
    src = tmp_path / "paras.pt"
    torch.save(state, src)
    err = _fails(tmp_path, capsys, "--from", "authors", str(src))
    assert "1 missing (layer3.0.downsample.1.bn_adv.running_var)" in err
    assert "1 wrong (layer2.1.conv2.weight (8, 8, 2, 3) != (8, 8, 3, 3))" in err


def test_an_extra_tensor_is_unexpected_not_ignored(tmp_path, capsys):
    state = resnet18_state("authors", 0.0625)
    state["layer4.1.bn3.bn_adv.weight"] = torch.ones(32)
    src = tmp_path / "paras.pt"
    torch.save(state, src)
    err = _fails(tmp_path, capsys, "--from", "authors", str(src))
    assert "1 unexpected (layer4.1.bn3.bn_adv.weight)" in err


@pytest.mark.parametrize(
    "content, words",
    [
        (b"<html>Google Drive: virus scan warning</html>", "not a readable PyTorch checkpoint"),
        ([1, 2, 3], "holds list, not a state dict"),
        ({"conv1.weight": torch.zeros(4, 1, 3, 3)}, "no CIFAR ResNet-18 stem"),
    ],
    ids=["html-page", "list", "not-resnet"],
)
def test_a_file_that_is_not_a_checkpoint_is_one_error(tmp_path, capsys, content, words):
    src = tmp_path / "download.pt"
    if isinstance(content, bytes):
        src.write_bytes(content)
    else:
        torch.save(content, src)
    assert words in _fails(tmp_path, capsys, "--from", "acl", str(src))


def test_a_pickled_object_is_refused_without_running_it(tmp_path, capsys):
    src = tmp_path / "model.pt"
    torch.save({"state_dict": resnet18_state("acl", 0.0625), "args": Path("x")}, src)
    assert "refused to load" in _fails(tmp_path, capsys, "--from", "acl", str(src))


def test_the_sha256_is_checked_before_reading(tmp_path, capsys):
    src = tmp_path / "paras.pt"
    torch.save(resnet18_state("authors", 0.0625), src)
    err = _fails(tmp_path, capsys, "--from", "authors", str(src), "--sha256", "0" * 64)
    assert "does not match the expected" in err


def test_it_converts_a_download_outside_a_project_folder(tmp_path, monkeypatch, capsys):
    """No params.yaml in the working folder: import-encoder reads no param, it just converts."""
    src = tmp_path / "paras.pt"
    torch.save(resnet18_state("authors", 0.0625), src)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["import-encoder", "--from", "authors", "paras.pt", "--out", "encoder.pt"]) == 0
    assert (tmp_path / "encoder.pt").is_file() and "no params.yaml" not in capsys.readouterr().err
