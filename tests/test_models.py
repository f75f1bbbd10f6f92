"""The GPUNet family: parameter counts, NVIDIA's module layout, shapes, modes, timm, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch

import gpunet_core
from gpunet_core.cli import main as cli_main
from gpunet_core.models.factory import count_parameters
from gpunet_core.models.layers import SqueezeExcite, make_divisible
from gpunet_core.models.spec import spec_json

# Trainable parameter counts from NVIDIA's reference builder (shared/gpunet_reference/README.md).
REFERENCE_PARAMS = {
    "gpunet_0": 11_885_432,
    "gpunet_1": 12_704_192,
    "gpunet_2": 25_798_704,
    "gpunet_p0": 22_815_080,
    "gpunet_p1": 39_905_672,
    "gpunet_d1": 10_589_859,
    "gpunet_d2": 19_036_728,
}
DISPLAY = {"gpunet_0": "GPUNet-0", "gpunet_1": "GPUNet-1", "gpunet_2": "GPUNet-2",
           "gpunet_p0": "GPUNet-P0", "gpunet_p1": "GPUNet-P1", "gpunet_d1": "GPUNet-D1",
           "gpunet_d2": "GPUNet-D2"}
BLOCKS_MD = Path(__file__).parent / "data" / "reference_blocks.md"


def meta_model(name, **kw):
    with torch.device("meta"):
        return gpunet_core.create_model(name, **kw)


def test_list_models():
    assert gpunet_core.list_models() == list(REFERENCE_PARAMS)


@pytest.mark.parametrize("name", list(REFERENCE_PARAMS))
def test_parameter_counts_match_reference(name):
    assert count_parameters(meta_model(name)) == REFERENCE_PARAMS[name]


def test_make_divisible_examples():
    assert make_divisible(96 * 7.67) == 736
    assert make_divisible(704 * 3.82) == 2688
    assert make_divisible(3) == 8


def parse_blocks_table():
    """BLOCKS.md rows per model: name -> list of dicts."""
    tables, current = {}, None
    for line in BLOCKS_MD.read_text().splitlines():
        m = re.match(r"#### (GPUNet-\w+) ", line)
        if m:
            current = tables.setdefault(m.group(1), [])
            continue
        if current is not None and line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            current.append(dict(zip(
                ["name", "type", "in", "mid", "out", "k", "s", "pad", "act", "se", "residual",
                 "drop_path"], cells, strict=True)))
    return tables


BLOCK_ROWS = parse_blocks_table()


@pytest.mark.parametrize("name", list(REFERENCE_PARAMS))
def test_blocks_follow_reference_table(name):
    model = gpunet_core.create_model(name)
    rows = BLOCK_ROWS[DISPLAY[name]]
    children = list(model.network.named_children())
    assert [n for n, _ in children] == [r["name"].strip("`") for r in rows]
    for (child_name, module), row in zip(children, rows, strict=True):
        convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
        first = convs[0]
        assert first.in_channels == int(row["in"]), child_name
        if row["type"] in ("InvertedResidual", "EdgeResidual", "Inverted_Residual_Block"):
            main = module.conv_dw if hasattr(module, "conv_dw") else (
                module.conv_exp if hasattr(module, "conv_exp") else module.body[3])
            assert main.kernel_size == (int(row["k"]),) * 2, child_name
            assert main.stride == (int(row["s"]),) * 2, child_name
            assert main.padding == (int(row["pad"]),) * 2, child_name
            mid = main.out_channels
            assert mid == int(row["mid"]), child_name
            assert module.has_skip == (row["residual"] == "True"), child_name
            assert module.drop_path_rate == pytest.approx(float(row["drop_path"]), abs=6e-5)
            se = getattr(module, "se", None)
            if row["se"] == "-":
                assert not isinstance(se, SqueezeExcite)
            else:
                assert se.conv_reduce.out_channels == int(row["se"])
        if row["type"] == "ConvBnAct":
            assert module.conv.padding == (int(row["pad"]),) * 2
            assert module.conv.stride == (int(row["s"]),) * 2
        act_cls = {"SiLU": torch.nn.SiLU, "ReLU": torch.nn.ReLU}[row["act"]]
        acts = [m for m in module.modules() if isinstance(m, (torch.nn.SiLU, torch.nn.ReLU))]
        if row["type"].startswith(("Prologue", "ConvBnAct", "Inverted", "Edge")):
            assert all(isinstance(a, act_cls) for a in acts), child_name
        bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        expected_eps = 1e-5 if name in ("gpunet_d1", "gpunet_d2") else 1e-3
        assert all(bn.eps == expected_eps for bn in bns), child_name
    tail = children[-1][1]
    assert tail.net[tail.classifier_index].out_features == 1000
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.2 for m in tail.modules())


def test_nvidia_key_examples():
    sd0 = meta_model("gpunet_0").state_dict()
    keys = list(sd0)
    assert keys[0] == "network.head: 2.net.0.weight" and sd0[keys[0]].shape == (32, 3, 3, 3)
    assert "network.stage: 1 layer3.conv.weight" in sd0
    assert sd0["network.stage: 2 layer5.conv_exp.weight"].shape == (160, 32, 3, 3)
    assert sd0["network.stage: 6 layer13.se.conv_reduce.weight"].shape == (64, 1280, 1, 1)
    assert "network.stage: 6 layer13.se.conv_reduce.bias" in sd0
    assert sd0["network. layer15.net.0.weight"].shape == (1280, 704, 1, 1)
    assert keys[-2:] == ["network. layer15.net.6.weight", "network. layer15.net.6.bias"]
    assert sd0["network. layer15.net.6.weight"].shape == (1000, 1280)
    assert "network.head: 2.net.1.num_batches_tracked" in sd0

    d1 = meta_model("gpunet_d1").state_dict()
    assert list(d1)[0] == "network.head:.net.0.weight"
    assert d1["network.head:.net.0.weight"].shape == (33, 3, 3, 3)
    assert d1["network.stage: 0 irb3.body.0.weight"].shape == (33, 33, 1, 1)
    assert d1["network.tail:.net.0.weight"].shape == (1152, 268, 1, 1)
    assert d1["network.tail:.net.4.weight"].shape == (1984, 1152, 1, 1)
    assert list(d1)[-2:] == ["network.tail:.net.8.weight", "network.tail:.net.8.bias"]
    d2 = meta_model("gpunet_d2").state_dict()
    assert {f"network.head:.net.{i}.weight" for i in (0, 1, 3, 4, 6, 7)} <= set(d2)

    tails = {n: [k for k in meta_model(n).state_dict() if k.startswith("network. layer")][0]
             for n in ("gpunet_0", "gpunet_1", "gpunet_2", "gpunet_p0", "gpunet_p1")}
    assert [t.split(".")[1] for t in tails.values()] == [
        " layer15", " layer17", " layer35", " layer17", " layer18"]


def expected_nvidia_layout(name):
    """Key -> shape from the naming/shape rules of NVIDIA's README, independent of the builder."""
    spec = spec_json(name)
    distill = spec[0]["distill"]
    out = {}

    def bn(prefix, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.{p}"] = (c,)
        out[f"{prefix}.num_batches_tracked"] = ()

    for n, e in enumerate(spec, start=1):
        t = e["layer_type"]
        if t == "data":
            continue
        cin, cout = e["num_in_channels"], e["num_out_channels"]
        if distill:
            if t in ("head", "head_large"):
                p = "network.head:"
                out[f"{p}.net.0.weight"] = (cout, cin, 3, 3)
                bn(f"{p}.net.1", cout)
                if t == "head_large":
                    for i in (3, 6):
                        out[f"{p}.net.{i}.weight"] = (cout, cout, 3, 3)
                        bn(f"{p}.net.{i + 1}", cout)
            elif t == "irb":
                p, mid, k, g = (f"network.stage: {e['stage']} irb{n}", cin * e["expansion"],
                                e["kernel_size"], e["groups"])
                out[f"{p}.body.0.weight"] = (mid, cin // g, 1, 1)
                bn(f"{p}.body.1", mid)
                out[f"{p}.body.3.weight"] = (mid, 1, k, k)
                bn(f"{p}.body.4", mid)
                out[f"{p}.body.6.weight"] = (cout, mid // g, 1, 1)
                bn(f"{p}.body.7", cout)
            elif t == "tail":
                p = "network.tail:"
                out[f"{p}.net.0.weight"] = (1152, cin, 1, 1)
                bn(f"{p}.net.1", 1152)
                out[f"{p}.net.4.weight"] = (cout, 1152, 1, 1)
                out[f"{p}.net.8.weight"] = (1000, cout)
                out[f"{p}.net.8.bias"] = (1000,)
            continue
        if t == "head":
            out[f"network.head: {n}.net.0.weight"] = (cout, cin, 3, 3)
            bn(f"network.head: {n}.net.1", cout)
        elif t == "conv":
            p, k = f"network.stage: {e['stage']} layer{n}", e["kernel_size"]
            out[f"{p}.conv.weight"] = (cout, cin, k, k)
            bn(f"{p}.bn1", cout)
        elif t in ("irb", "fused_irb"):
            p, k, exp = f"network.stage: {e['stage']} layer{n}", e["kernel_size"], e["expansion"]
            mid = make_divisible(cin * exp)
            if t == "irb":
                out[f"{p}.conv_pw.weight"] = (mid, cin, 1, 1)
                bn(f"{p}.bn1", mid)
                out[f"{p}.conv_dw.weight"] = (mid, 1, k, k)
                bn(f"{p}.bn2", mid)
                last_bn = "bn3"
            else:
                out[f"{p}.conv_exp.weight"] = (mid, cin, k, k)
                bn(f"{p}.bn1", mid)
                last_bn = "bn2"
            if e["use_se"]:
                rd = round(mid * 0.25 / exp)
                out[f"{p}.se.conv_reduce.weight"] = (rd, mid, 1, 1)
                out[f"{p}.se.conv_reduce.bias"] = (rd,)
                out[f"{p}.se.conv_expand.weight"] = (mid, rd, 1, 1)
                out[f"{p}.se.conv_expand.bias"] = (mid,)
            out[f"{p}.conv_pwl.weight"] = (cout, mid, 1, 1)
            bn(f"{p}.{last_bn}", cout)
        elif t == "tail":
            p = f"network. layer{n}"
            out[f"{p}.net.0.weight"] = (cout, cin, 1, 1)
            bn(f"{p}.net.1", cout)
            out[f"{p}.net.6.weight"] = (e["num_classes"], cout)
            out[f"{p}.net.6.bias"] = (e["num_classes"],)
    return out


@pytest.mark.parametrize("name", list(REFERENCE_PARAMS))
def test_state_dict_layout_is_nvidias(name):
    layout = expected_nvidia_layout(name)
    sd = meta_model(name).state_dict()
    assert list(sd) == list(layout) or set(sd) == set(layout)
    assert {k: tuple(v.shape) for k, v in sd.items()} == layout


def test_spatial_sizes_follow_blocks_md():
    def sizes(name, res, pick):
        model = gpunet_core.create_model(name).eval()
        seen = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o.shape[-1]))
                 for n, m in model.network.named_children() if n in pick]
        with torch.no_grad():
            model(torch.zeros(1, 3, res, res))
        for h in hooks:
            h.remove()
        return [seen[n] for n in pick]

    assert sizes("gpunet_0", 320, ["head: 2", "stage: 2 layer5", "stage: 3 layer7",
                                   "stage: 4 layer10", "stage: 6 layer13"]) == [160, 79, 39, 20, 10]
    assert sizes("gpunet_1", 288, ["head: 2", "stage: 2 layer4", "stage: 3 layer6"]) == [144, 71, 35]
    assert sizes("gpunet_2", 384, ["head: 2", "stage: 2 layer6", "stage: 3 layer7"]) == [192, 94, 46]


@pytest.mark.parametrize("name", list(REFERENCE_PARAMS))
def test_forward_native_and_small_resolution(name):
    torch.manual_seed(0)
    model = gpunet_core.create_model(name, num_classes=7).eval()
    res = model.pretrained_cfg["input_size"][-1]
    assert res == {"gpunet_0": 320, "gpunet_1": 288, "gpunet_2": 384, "gpunet_p0": 224,
                   "gpunet_p1": 224, "gpunet_d1": 456, "gpunet_d2": 528}[name]
    with torch.no_grad():
        assert model(torch.randn(1, 3, res, res)).shape == (1, 7)
        small = torch.randn(2, 3, 64, 64)
        a, b = model(small), model(small)
    assert a.shape == (2, 7) and torch.isfinite(a).all()
    assert torch.equal(a, b), "eval mode must be deterministic (no dropout/drop path)"


def test_train_mode_applies_dropout_and_drop_path():
    torch.manual_seed(0)
    model = gpunet_core.create_model("gpunet_0", num_classes=5, drop_rate=0.0).train()
    x = torch.randn(4, 3, 64, 64)
    outs = [model(x) for _ in range(2)]
    assert not torch.allclose(outs[0], outs[1]), "drop path must make train-mode passes differ"
    no_dp = gpunet_core.create_model("gpunet_0", num_classes=5, drop_rate=0.0, drop_path_rate=0.0)
    no_dp.load_state_dict(model.state_dict())
    no_dp.train()
    # BN in train mode uses batch stats, so only stochastic parts can make these differ.
    assert torch.allclose(no_dp(x), no_dp(x))
    with_dropout = gpunet_core.create_model("gpunet_d1", num_classes=5, drop_rate=0.5).train()
    assert with_dropout.spec.distill
    assert not torch.allclose(with_dropout(x), with_dropout(x))
    with_dropout.eval()
    assert torch.equal(with_dropout(x), with_dropout(x))


def test_pretrained_cfg():
    cfg = gpunet_core.create_model("gpunet_p0").pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["classifier"] == "network. layer17.net.6"
    assert gpunet_core.create_model("gpunet_d2").pretrained_cfg["crop_pct"] == 1.0


def test_timm_registry():
    model = timm.create_model("gpunet_p0")
    assert isinstance(model, gpunet_core.GPUNet)
    assert count_parameters(model) == REFERENCE_PARAMS["gpunet_p0"]
    small = timm.create_model("gpunet_0", num_classes=10)
    assert small.num_classes == 10 and small.get_classifier().out_features == 10
    assert set(REFERENCE_PARAMS) <= set(timm.list_models("gpunet_*"))


def test_reset_classifier_and_features():
    model = gpunet_core.create_model("gpunet_1").eval()
    model.reset_classifier(3)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)  # timm's split: up to the tail's 1x1 conv-BN-ReLU
        assert feats.shape[1] == model.num_features == 1280
        assert model.forward_head(feats).shape == (1, 3)
        assert torch.equal(model.forward_head(feats), model(x))


def test_unknown_model_lists_valid_names():
    with pytest.raises(gpunet_core.UnknownModelError, match="valid names are gpunet_0, gpunet_1"):
        gpunet_core.create_model("gpunet_9")


def test_cli_models_json(capsys):
    assert cli_main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(REFERENCE_PARAMS)
    by_name = {r["name"]: r for r in rows}
    assert by_name["gpunet_0"]["params"] == REFERENCE_PARAMS["gpunet_0"]
    assert [r["published_top1"] for r in rows] == [78.9, 80.5, 82.2, 80.3, 81.1, 82.5, 83.6]
    assert [r["published_latency_ms_a100_trt_fp16"] for r in rows] == [
        0.46, 0.59, 1.25, 0.45, 0.61, 0.94, 1.40]
    assert by_name["gpunet_d1"]["input_size"] == [3, 456, 456]


def test_cli_models_table(capsys):
    assert cli_main(["models"]) == 0
    out = capsys.readouterr().out
    assert "gpunet_p1" in out and "39,905,672" in out and "0.875" in out


def test_drop_path_draws_and_scales_like_timms():
    from timm.layers import drop_path as timm_drop_path

    from gpunet_core.models.layers import drop_path

    x = torch.randn(16, 4, 3, 3)
    for prob in (0.0, 0.3, 1.0):
        torch.manual_seed(5)
        ours = drop_path(x, prob, True)
        torch.manual_seed(5)
        assert torch.equal(ours, timm_drop_path(x, prob, True)), prob
    assert drop_path(x, 0.5, False) is x
