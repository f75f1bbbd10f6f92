"""GPUNet as a first-class timm model: registry, cfgs, features, intermediates, TorchScript, FX.

Mirrors what timm's own tests/test_models.py checks of every timm model (test_model_forward,
_backward, _default_cfgs, _forward_features, _forward_intermediates, _forward_torchscript,
_forward_fx, _backward_fx) on the seven GPUNets (native sizes only on the meta device), at
32 px (64 px for the feature maps) so the file stays fast on a CPU; plus pretrained
loading, errors and the registration hook.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from timm.models import FeatureInfo, get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import (
    NodePathTracer,
    create_feature_extractor,
    get_graph_node_names,
)

import gpunet_core
from gpunet_core.models import gpunet as gpunet_module
from gpunet_core.models.builder import feature_map_size, feature_stages
from gpunet_core.models.factory import create_model
from gpunet_core.models.gpunet import GPUNet
from gpunet_core.models.spec import MODEL_INFO, shipped_spec
from gpunet_core.utils.errors import GpunetError, ModelConfigError, UnknownModelError

MODELS = list(MODEL_INFO)
SIZE, BATCH = 32, 2
FEATURE_SIZE = 64  # every level's map differs in size
RES = {"gpunet_0": 320, "gpunet_1": 288, "gpunet_2": 384, "gpunet_p0": 224, "gpunet_p1": 224,
       "gpunet_d1": 456, "gpunet_d2": 528}


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(BATCH, 3, SIZE, SIZE)


def _meta(name, **kwargs):
    return timm.create_model(name, device="meta", **kwargs).eval()


# --------------------------------------------------------------------------- registry and cfgs


def test_registry_lists_pretrained_and_cfgs():
    natural = ["gpunet_0", "gpunet_1", "gpunet_2", "gpunet_d1", "gpunet_d2", "gpunet_p0",
               "gpunet_p1"]
    assert timm.list_models("gpunet*") == natural
    assert timm.list_pretrained("gpunet*") == natural  # weights exist (NGC), found locally
    assert timm.list_models(module="gpunet") == natural
    for name in MODELS:
        cfg = timm.get_pretrained_cfg(name)
        assert cfg.architecture == name and cfg.num_classes == 1000
        assert cfg.input_size == (3, RES[name], RES[name])
        assert cfg.crop_pct == MODEL_INFO[name]["crop_pct"] and cfg.interpolation == "bicubic"
        assert cfg.file == f"{MODEL_INFO[name]['config'][:-5]}.pth.tar" and not cfg.url
        assert cfg.paper_ids == "arXiv:2205.00841" and "NGC" in cfg.notes[0]
        assert timm.models.is_model_pretrained(name)
    assert timm.models.get_pretrained_cfg_value("gpunet_p0", "crop_pct") == 0.875
    assert gpunet_module.default_cfgs["gpunet_d2"].default.pool_size == (17, 17)


@pytest.mark.parametrize("name", MODELS)
def test_both_factories_build_the_same_model(name):
    with torch.device("meta"):
        ours = create_model(name)
    theirs = _meta(name)
    assert ours.pretrained_cfg == theirs.pretrained_cfg
    assert ours.pretrained_cfg["published_top1"] == MODEL_INFO[name]["top1"]
    assert {k: v.shape for k, v in ours.state_dict().items()} == \
        {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("name", MODELS)
def test_model_default_cfgs(name):
    """timm's test_model_default_cfgs at the native resolution (shapes only: meta device)."""
    model = _meta(name)
    cfg = model.pretrained_cfg
    assert model.num_classes == 1000 and model.num_features > 0 and model.head_hidden_size > 0
    state_dict = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in state_dict
    assert f"{cfg['classifier']}.weight" in state_dict
    assert cfg["classifier"] == model.classifier_name
    inputs = torch.empty(1, *cfg["input_size"], device="meta")
    features = model.forward_features(inputs)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert features.shape[1:] == (model.num_features, *cfg["pool_size"])
    assert cfg["pool_size"] == (feature_map_size(shipped_spec(name), RES[name]),) * 2
    assert pre_logits.shape == (1, model.head_hidden_size)
    assert model(inputs).shape == (1, 1000)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(inputs).shape == pre_logits.shape
    model.reset_classifier(0, "")  # no pool: unpooled features come out
    assert model(inputs).shape[2:] == cfg["pool_size"]
    headless = _meta(name, num_classes=0, global_pool="")
    assert headless(inputs).shape == (1, model.head_hidden_size, *cfg["pool_size"])


@pytest.mark.parametrize("name", MODELS)
def test_meta_device_dtype_and_cfg_overlay(name):
    overlay = dict(crop_pct=0.5, input_size=(3, 256, 256), mean=(0.5,) * 3, std=(0.5,) * 3)
    model = timm.create_model(name, pretrained_cfg_overlay=overlay, device="meta",
                              dtype=torch.bfloat16)
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert {k: model.pretrained_cfg[k] for k in overlay} == overlay
    assert model.pretrained_cfg["ngc_model"] == f"nvidia/dle/{name}_pyt_ckpt"  # metadata kept


def test_entry_points_take_timms_arguments(tmp_path):
    model = timm.create_model(
        "gpunet_p0", pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay={},
        cache_dir=tmp_path, scriptable=True, exportable=True, no_jit=True, num_classes=10,
        in_chans=1, drop_rate=0.1, drop_path_rate=0.05, global_pool="max", device="cpu",
        dtype=torch.float32)
    assert isinstance(model, GPUNet) and model.in_chans == 1 and model.num_classes == 10
    assert model.global_pool == "max" and model.drop_rate == 0.1
    assert isinstance(model.tail.net[3], torch.nn.AdaptiveMaxPool2d)
    n = len(shipped_spec("gpunet_p0").layers)  # entry i of n gets rate * i / (n - 1)
    rates = [m.drop_path_rate for m in model.modules() if hasattr(m, "drop_path_rate")]
    assert max(rates) == pytest.approx(0.05 * (n - 2) / (n - 1))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, SIZE, SIZE)).shape == (1, 10)
    # a model's own cfg (with NVIDIA's extra keys) goes back in as pretrained_cfg
    again = timm.create_model("gpunet_p0", pretrained_cfg=model.pretrained_cfg, device="meta")
    assert again.pretrained_cfg["crop_pct"] == 0.875
    # the entry points also work when called directly, as timm's do
    feats = gpunet_module.gpunet_d1(features_only=True, out_indices=(1, 3), feature_cls="dict")
    assert list(feats(torch.randn(1, 3, SIZE, SIZE))) == ["1", "3"]
    with pytest.raises(RuntimeError, match="Invalid pretrained tag"):
        timm.create_model("gpunet_0.no_such_tag")


def test_model_config_errors_name_the_argument_and_range():
    cases = [
        (dict(num_classes=-1), r"num_classes must be >= 0 \(0: no classifier\), got -1"),
        (dict(num_classes=2.5), r"num_classes must be an integer, got 2.5"),
        (dict(drop_rate=1.0), r"drop_rate must be in \[0, 1\), got 1.0"),
        (dict(drop_path_rate=-0.1), r"drop_path_rate must be in \[0, 1\), got -0.1"),
        (dict(in_chans=0), r"in_chans must be an integer >= 1, got 0"),
        (dict(global_pool="avgmax"), r"global_pool must be one of 'avg', 'max', '', got 'avgmax'"),
        (dict(global_pool=""), r"global_pool='' \(no pooling\) needs num_classes=0, got 1000"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ModelConfigError, match=message) as info:
            timm.create_model("gpunet_0", device="meta", **kwargs)
        assert isinstance(info.value, (GpunetError, ValueError))
        assert not isinstance(info.value, UnknownModelError)
    with pytest.raises(ModelConfigError, match=r"num_classes \(--num-classes\) must be >= 1, got 0"):
        gpunet_core.create_model("gpunet_0", num_classes=0)
    with pytest.raises(ModelConfigError, match="drop_path_rate must be in"):
        gpunet_core.create_model("gpunet_d1", drop_path_rate=1.5)
    model = _meta("gpunet_0")
    with pytest.raises(ModelConfigError, match="global_pool='' .* needs num_classes=0"):
        model.reset_classifier(5, "")
    with pytest.raises(ModelConfigError, match=r"feature index 9 must be in \[-5, 4\]"):
        model.forward_intermediates(torch.empty(1, 3, SIZE, SIZE, device="meta"), indices=[9])
    with pytest.raises(ModelConfigError, match="output_fmt must be 'NCHW'"):
        model.forward_intermediates(torch.empty(1, 3, SIZE, SIZE, device="meta"),
                                    output_fmt="NHWC")


# --------------------------------------------------------------------------- forward and backward


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_and_grad_checkpointing(name, x):
    model = timm.create_model(name).eval()
    with torch.no_grad():
        out = model(x)
        assert out.shape == (BATCH, 1000) and not torch.isnan(out).any()
        model.set_grad_checkpointing()
        assert torch.allclose(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_model_backward(name, x):
    model = timm.create_model(name, num_classes=42).train()
    out = model(x)
    out.mean().backward()
    assert out.shape == (BATCH, 42) and not torch.isnan(out).any()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("name", ["gpunet_0", "gpunet_p1", "gpunet_d1"])
def test_grad_checkpointing_recomputes_and_keeps_gradients(name, x, monkeypatch):
    def grads(model):
        torch.manual_seed(1)  # the same drop-path draws in both runs
        model.zero_grad()
        model(x).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    model = timm.create_model(name, num_classes=5, drop_rate=0.0, drop_path_rate=0.1).train()
    plain = grads(model)
    calls = []
    real = gpunet_module.checkpoint
    monkeypatch.setattr(gpunet_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.set_grad_checkpointing(True)
    checkpointed = grads(model)
    assert len(calls) == model.num_blocks  # every stem/block layer went through checkpoint()
    for n, g in plain.items():
        assert torch.allclose(checkpointed[n], g, rtol=1e-4, atol=1e-6), n


def test_forward_head_pre_logits_and_reset_classifier(x):
    for name in ("gpunet_1", "gpunet_d2"):  # one tail of each family
        model = timm.create_model(name).eval()
        with torch.no_grad():
            feats = model.forward_features(x)
            pre = model.forward_head(feats, pre_logits=True)
            assert pre.shape == (BATCH, model.head_hidden_size)
            assert torch.allclose(model.get_classifier()(pre), model(x), atol=1e-5)
            model.reset_classifier(5)
            assert model(x).shape == (BATCH, 5) and model.num_classes == 5
            assert model.get_classifier().in_features == model.head_hidden_size
            assert not model.get_classifier().training  # the mode is kept
            model.reset_classifier(3, "max")
            assert torch.allclose(model.forward_head(feats, pre_logits=True),
                                  model.forward_head(feats.amax((2, 3), keepdim=True), True))
        assert (model.num_features, model.head_hidden_size) == (
            {"gpunet_1": (1280, 1280), "gpunet_d2": (1152, 1984)}[name])


# --------------------------------------------------------------------------- features


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_features(name):
    model = timm.create_model(name, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3 and reductions == [2, 4, 8, 16, 32]
    with torch.no_grad():
        outputs = model(torch.randn(BATCH, 3, FEATURE_SIZE, FEATURE_SIZE))
    assert len(outputs) == len(channels)
    arch = shipped_spec(name)
    for info, c, r, o in zip(model.feature_info.get_dicts(), channels, reductions, outputs,
                             strict=True):
        assert o.shape[:2] == (BATCH, c) and not torch.isnan(o).any()
        assert o.shape[-1] <= math.ceil(FEATURE_SIZE / r) + 1  # timm's bound
        assert o.shape[-1] == o.shape[-2] == feature_map_size(arch, FEATURE_SIZE,
                                                              upto=info["stage"])


@pytest.mark.parametrize("feature_cls", ["list", "dict", "hook", "getter", "fx"])
@pytest.mark.parametrize("name", ["gpunet_p0", "gpunet_d1"])
def test_every_timm_feature_class(name, feature_cls, x):
    """The second and the last level (P0: reduction 64, beyond timm's default out_indices)."""
    levels = feature_stages(shipped_spec(name))
    model = timm.create_model(name, features_only=True, out_indices=(1, -1),
                              feature_cls=feature_cls).eval()
    with torch.no_grad():
        got = model(x)
    got = list(got.values()) if isinstance(got, dict) else got
    assert [o.shape[1] for o in got] == [levels[1]["num_chs"], levels[-1]["num_chs"]]
    assert model.feature_info.reduction() == [levels[1]["reduction"], levels[-1]["reduction"]]


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_intermediates(name, x):
    model = timm.create_model(name).eval()
    info = FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) >= 5
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
        assert len(intermediates) == len(info.channels())
        for c, r, o in zip(info.channels(), info.reduction(), intermediates, strict=True):
            assert o.shape[:2] == (BATCH, c) and o.shape[-1] <= math.ceil(SIZE / r) + 1
        assert torch.allclose(output, model.forward_features(x))
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(last2, intermediates[-2:], strict=True))
        early, picked = model.forward_intermediates(x, indices=[0, 2], stop_early=True)
        assert torch.equal(early, intermediates[2]) and torch.equal(picked[1], intermediates[2])
        model.set_grad_checkpointing()
        output3, _ = model.forward_intermediates(x)
        assert torch.allclose(output, output3, rtol=1e-4, atol=1e-5)
        # pruning keeps what the picked levels need, under the same state-dict keys
        keys = set(model.state_dict())
        params = sum(p.numel() for p in model.parameters())
        assert model.prune_intermediate_layers([1, 2]) == [1, 2]
        assert set(model.state_dict()) < keys and sum(p.numel() for p in model.parameters()) < params
        pruned = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(pruned, intermediates[1:3], strict=True))
        assert model.forward_features(x).shape == intermediates[2].shape == model(x).shape
        assert model.num_classes == 0 and model.num_features == info.channels()[2]


# --------------------------------------------------------------------------- TorchScript and FX


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_and_backward_torchscript(name, x):
    with timm.set_scriptable(True):
        model = timm.create_model(name, num_classes=42)
    scripted = torch.jit.script(model.eval())
    with torch.jit.optimized_execution(False):  # compiling the optimized graphs takes seconds
        with torch.no_grad():
            assert torch.allclose(scripted(x), model(x), atol=1e-5)
            assert scripted.forward_features(x).shape[1] == model.num_features
        scripted.train()  # drop path and dropout are scripted too
        out = scripted(x)
        out.mean().backward()
    assert out.shape == (BATCH, 42) and all(p.grad is not None for p in scripted.parameters())


def _create_fx_model(model, train=False):
    """timm's tests/test_models.py helper: a torchvision feature extractor of the output node."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(),
                         autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    eval_return_nodes, train_return_nodes = [eval_nodes[-1]], [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        graph_nodes = list(reversed(graph.nodes))
        output_node_names = [n.name for n in graph_nodes[0]._input_nodes]
        graph_node_names = [n.name for n in graph_nodes]
        indices = [-graph_node_names.index(n) for n in output_node_names]
        train_return_nodes = [train_nodes[ix] for ix in indices]
    return create_feature_extractor(model, train_return_nodes=train_return_nodes,
                                    eval_return_nodes=eval_return_nodes,
                                    tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("name", MODELS)
def test_model_forward_and_backward_fx(name, x):
    model = timm.create_model(name).eval()
    with torch.inference_mode():
        outputs = model(x)
        fx_outputs = torch.cat(tuple(_create_fx_model(model)(x).values()))
    assert torch.all(fx_outputs == outputs)

    model = timm.create_model(name, num_classes=42).train()
    fx_model = _create_fx_model(model, train=True)
    out = torch.cat(tuple(fx_model(x).values()))
    out.mean().backward()
    assert out.shape == (BATCH, 42)
    num_params = sum(p.numel() for p in model.parameters())
    assert sum(p.grad.numel() for p in fx_model.parameters() if p.grad is not None) == num_params
    plain = timm.create_model(name).eval()
    with torch.no_grad():
        assert torch.equal(torch.fx.symbolic_trace(plain)(x), plain(x))


# --------------------------------------------------------------------------- pretrained weights


def _random_state_dict(model):
    gen = torch.Generator().manual_seed(3)
    return {k: torch.randint(0, 9, v.shape, generator=gen) if v.dtype == torch.long
            else torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}


def test_pretrained_loads_nvidias_local_file_through_timm(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUNET_PRETRAINED_DIR", str(tmp_path))
    sd = _random_state_dict(create_model("gpunet_p0"))
    torch.save(sd, tmp_path / "0.5ms-D.pth.tar")  # P0/P1 ship a bare state dict
    model = timm.create_model("gpunet_p0", pretrained=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    assert model.pretrained_cfg["file"] == str(tmp_path / "0.5ms-D.pth.tar")
    ours = create_model("gpunet_p0", pretrained=True)  # the same lookup without timm's factory
    assert torch.equal(ours.state_dict()["network.head: 2.net.0.weight"],
                       sd["network.head: 2.net.0.weight"])

    tuned = timm.create_model("gpunet_p0", pretrained=True, num_classes=10, in_chans=1)
    got = tuned.state_dict()
    assert got[f"{tuned.classifier_name}.weight"].shape == (10, 1984)  # fresh classifier
    assert torch.equal(got["network. layer17.net.0.weight"], sd["network. layer17.net.0.weight"])
    assert torch.allclose(got["network.head: 2.net.0.weight"],
                          sd["network.head: 2.net.0.weight"].sum(1, keepdim=True))

    feats = timm.create_model("gpunet_p0", pretrained=True, features_only=True)
    assert torch.equal(feats["network_stage: 2 layer5"].conv.weight,
                       sd["network.stage: 2 layer5.conv.weight"])
    assert "classifier" not in feats.pretrained_cfg and "ngc_model" in feats.pretrained_cfg

    elsewhere = tmp_path / "sub" / "mine.pth"
    elsewhere.parent.mkdir()
    torch.save({"state_dict_ema": sd}, elsewhere)
    picked = timm.create_model("gpunet_p0", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(elsewhere)))
    assert picked.pretrained_cfg["file"] == str(elsewhere)
    with pytest.raises(gpunet_core.CheckpointError, match="nvidia/dle/gpunet_1_pyt_ckpt"):
        timm.create_model("gpunet_1", pretrained=True)


# --------------------------------------------------------------------------- registration


def _python(code: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


def test_registration_survives_find_spec_probes_and_any_import_order():
    hook = "any(type(f).__name__ == '_RegisterAfterTimm' for f in sys.meta_path)"
    assert _python(f"""
        import importlib.util, sys
        import gpunet_core.models
        from gpunet_core.models import create_model
        create_model("gpunet_0", num_classes=3)  # builds without timm
        for _ in range(2):
            assert importlib.util.find_spec("timm") is not None  # probes, as libraries do
        print("timm" in sys.modules, {hook})
        import timm
        print(timm.is_model("gpunet_0"), timm.list_pretrained("gpunet_d*") == ["gpunet_d1",
              "gpunet_d2"], {hook})
    """) == ["False", "True", "True", "True", "False"]
    assert _python(f"""
        import sys
        import timm  # before gpunet_core: registered on the package's import
        import gpunet_core
        print(timm.is_model("gpunet_d2"), {hook}, type(timm.create_model("gpunet_p1",
              device="meta")).__name__)
    """) == ["True", "False", "GPUNet"]
